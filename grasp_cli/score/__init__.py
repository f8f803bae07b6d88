"""`grasp score`: predicted utilities of subsets and marginal gains of examples."""
