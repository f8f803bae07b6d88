"""`grasp status`: what a run holds, what is stale or damaged, what is missing."""
