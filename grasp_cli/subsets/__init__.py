"""Subset designs for retrain-subsets: uniform, mixture, within-domain, and given."""

from grasp_cli.artifacts.subsets import (
    SubsetInputError,
    members_of,
    pack_membership,
    read_subset_table,
    unpack_membership,
)
from grasp_cli.subsets.designs import (
    DESIGN_ORDER,
    DesignArgs,
    DomainLayout,
    SubsetPlan,
    allocate,
    balanced_order,
    plan_subsets,
    sample_subset,
)

__all__ = [
    "DESIGN_ORDER",
    "DesignArgs",
    "DomainLayout",
    "SubsetInputError",
    "SubsetPlan",
    "allocate",
    "balanced_order",
    "members_of",
    "pack_membership",
    "plan_subsets",
    "read_subset_table",
    "sample_subset",
    "unpack_membership",
]
