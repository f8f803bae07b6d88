"""`grasp retrain-subsets`: counterfactual ground truth by training on many subsets."""
