"""Subset designs for retrain-subsets: uniform, mixture, within-domain, and given."""

from grasp_cli.subsets.designs import (
    DESIGN_ORDER,
    DesignArgs,
    DomainLayout,
    SubsetInputError,
    SubsetPlan,
    allocate,
    balanced_order,
    members_of,
    pack_membership,
    plan_subsets,
    read_given,
    sample_subset,
    unpack_membership,
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
    "read_given",
    "sample_subset",
    "unpack_membership",
]
