"""`grasp report`: one HTML page with PNG plots of everything in a run."""
