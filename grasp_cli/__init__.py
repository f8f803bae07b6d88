"""grasp: subset-level training-data attribution and data selection (GRASP, arXiv 2606.06892)."""

__version__ = "0.1.0"
