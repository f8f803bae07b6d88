"""Subset designs: determinism, independence from M, domain shares, sizes, roles, given subsets."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grasp_cli.config import SubsetsSection
from grasp_cli.subsets import (
    DesignArgs,
    SubsetInputError,
    allocate,
    balanced_order,
    members_of,
    pack_membership,
    plan_subsets,
    unpack_membership,
)

N = 1003  # not a multiple of 8
DOMAINS = ["web", "code", "books", "wiki", "math"]
COUNTS = [400, 300, 150, 100, 53]
CODES = np.repeat(np.arange(5), COUNTS)
CORPUS_SHARE = np.array(COUNTS) / N


def shares(plan, design):
    rows = np.flatnonzero(plan.design == design)
    return np.array(
        [np.bincount(CODES[plan.members(j)], minlength=5) / plan.sizes[j] for j in rows]
    )


def test_same_seed_same_bits_and_other_seed_differs():
    args = DesignArgs(designs={"mixture": 6, "uniform": 3, "within": 3})
    first = plan_subsets(args, N, CODES, DOMAINS, seed=11)
    again = plan_subsets(args, N, CODES, DOMAINS, seed=11)
    other = plan_subsets(args, N, CODES, DOMAINS, seed=12)
    np.testing.assert_array_equal(first.membership, again.membership)
    assert list(first.roles) == list(again.roles) and first.params == again.params
    assert not np.array_equal(first.membership, other.membership)
    assert first.membership.shape == (12, math.ceil(N / 8)) and first.membership.dtype == np.uint8
    np.testing.assert_array_equal(first.sizes, [first.members(j).size for j in range(12)])
    assert list(first.design) == ["mixture"] * 6 + ["uniform"] * 3 + ["within"] * 3


def test_subset_membership_does_not_depend_on_the_counts():
    small = plan_subsets(
        DesignArgs(designs={"mixture": 4, "uniform": 2}), N, CODES, DOMAINS, seed=3
    )
    large = plan_subsets(
        DesignArgs(designs={"mixture": 9, "uniform": 5, "within": 2}), N, CODES, DOMAINS, seed=3
    )
    np.testing.assert_array_equal(small.membership[:4], large.membership[:4])  # mixture k = 0..3
    np.testing.assert_array_equal(small.membership[4:6], large.membership[9:11])  # uniform k = 0..1


def test_mixture_varies_domain_shares_and_uniform_keeps_them():
    args = DesignArgs(designs={"mixture": 30, "uniform": 30, "within": 10}, dirichlet_alpha=0.5)
    plan = plan_subsets(args, N, CODES, DOMAINS, seed=0)
    mixture, uniform, within = (
        shares(plan, "mixture"),
        shares(plan, "uniform"),
        shares(plan, "within"),
    )
    # Every domain's share swings across mixture subsets; uniform halves barely move.
    assert mixture.std(axis=0).min() > 0.05 and mixture.std(axis=0).max() > 0.15
    assert uniform.std(axis=0).max() < 0.03
    np.testing.assert_allclose(uniform.mean(axis=0), CORPUS_SHARE, atol=0.01)
    np.testing.assert_allclose(
        within, np.broadcast_to(CORPUS_SHARE, within.shape), atol=2 / plan.sizes[-1]
    )
    # within varies which examples, not how many.
    within_sizes = plan.sizes[plan.design == "within"]
    assert len(set(within_sizes.tolist())) == 1 and within_sizes[0] == round(0.3 * N)
    assert not np.array_equal(plan.mask(60), plan.mask(61))


def test_mixture_sizes_and_weights_follow_the_draws():
    args = DesignArgs(designs={"mixture": 25}, size_min=0.05, size_max=0.6)
    plan = plan_subsets(args, N, CODES, DOMAINS, seed=4)
    assert plan.sizes.min() >= math.ceil(0.05 * N) and plan.sizes.max() <= math.floor(0.6 * N)
    for j in range(len(plan)):
        drawn = json.loads(plan.params[j])
        assert drawn["target_size"] == plan.sizes[j]
        assert sum(drawn["weights"].values()) == pytest.approx(1.0, abs=1e-4)
        counts = np.bincount(CODES[plan.members(j)], minlength=5)
        assert [drawn["counts"][d] for d in DOMAINS] == counts.tolist()
        uncapped = counts < np.array(COUNTS)
        weights = np.array([drawn["weights"][d] for d in DOMAINS])
        # Domains that are not full hold counts in proportion to their weights (±1 for rounding).
        if uncapped.sum() >= 2:
            scale = counts[uncapped].sum() / weights[uncapped].sum()
            assert np.abs(counts[uncapped] - scale * weights[uncapped]).max() <= 1.0 + 1e-6


def test_allocate_caps_and_redistributes():
    np.testing.assert_array_equal(
        allocate(100, np.array([0.9, 0.1]), np.array([50, 200])), [50, 50]
    )
    np.testing.assert_array_equal(
        allocate(10, np.array([1.0, 0.0, 0.0]), np.array([4, 3, 9])), [4, 2, 4]
    )
    rng = np.random.default_rng(0)
    for _ in range(200):
        capacity = rng.integers(0, 30, size=6)
        size = int(rng.integers(0, capacity.sum() + 1))
        counts = allocate(size, rng.dirichlet(np.full(6, 0.3)), capacity)
        assert counts.sum() == size and (counts <= capacity).all() and (counts >= 0).all()


def test_roles_follow_the_fraction_with_minimums():
    big = plan_subsets(
        DesignArgs(designs={"mixture": 300}, eval_fraction=0.35), N, CODES, DOMAINS, seed=1
    )
    assert set(big.roles) == {"fit", "eval"}
    assert abs(np.mean(big.roles == "eval") - 0.35) < 0.07
    rare = plan_subsets(
        DesignArgs(designs={"uniform": 8}, eval_fraction=0.01), N, CODES, DOMAINS, seed=1
    )
    assert (rare.roles == "eval").sum() >= 3 and (rare.roles == "fit").sum() >= 3
    common = plan_subsets(
        DesignArgs(designs={"uniform": 8}, eval_fraction=0.99), N, CODES, DOMAINS, seed=1
    )
    assert (common.roles == "fit").sum() >= 3
    split = plan_subsets(
        DesignArgs(designs={"mixture": 3, "within": 3}, eval_fraction=0.01),
        N,
        CODES,
        DOMAINS,
        seed=1,
    )
    assert (split.roles == "eval").sum() >= 3 and (split.roles == "fit").sum() >= 3


def test_plan_accepts_the_config_section():
    section = SubsetsSection(designs={"mixture": 3, "uniform": 2}, size_min=0.2, size_max=0.3)
    plan = plan_subsets(section, N, CODES, DOMAINS, seed=2)
    assert len(plan) == 5 and plan.sizes[:3].min() >= math.ceil(0.2 * N)


def test_given_subsets_map_ids_and_keep_roles(tmp_path):
    ids = 1000 + 3 * np.arange(N)
    table = pa.table(
        {
            "subset_id": [7, 7, 7, 2, 2],
            "id": [1000, 1003, 1003, 4000, 1006],
            "role": ["eval", "eval", "eval", "fit", "fit"],
        }
    )
    path = tmp_path / "given.parquet"
    pq.write_table(table, path)
    args = DesignArgs(designs={"mixture": 2, "given": 0}, given=str(path))
    plan = plan_subsets(args, N, CODES, DOMAINS, seed=0, ids=ids)
    assert list(plan.design) == ["mixture", "mixture", "given", "given"]
    assert list(plan.roles[2:]) == ["fit", "eval"]  # subset_id order: 2, then 7
    np.testing.assert_array_equal(plan.members(2), [2, 1000])
    np.testing.assert_array_equal(plan.members(3), [0, 1])
    assert json.loads(plan.params[3]) == {"given_subset_id": 7}
    without_role = plan_subsets(
        DesignArgs(designs={"given": 1}),
        N,
        CODES,
        DOMAINS,
        seed=0,
        ids=ids,
        given_table=table.drop(["role"]),
    )
    assert list(without_role.roles) == ["given"] and without_role.sizes.tolist() == [2]


def test_given_unknown_ids_are_named():
    unknown = list(range(5, 5 + 12))
    table = pa.table({"subset_id": [0] * 14, "id": [1000, 1003, *unknown]})
    # The corpus may be passed as its ids; given_path names the file in the message.
    with pytest.raises(
        ValueError,
        match="^sel.parquet: 12 id\\(s\\) not in the corpus: 5, 6, 7, 8, 9, 10, 11, 12, 13, 14 \\(and 2 more\\)$",
    ):
        plan_subsets(
            DesignArgs(designs={"given": 0}),
            1000 + 3 * np.arange(N),
            None,
            None,
            seed=0,
            given_table=table,
            given_path="sel.parquet",
        )
    with pytest.raises(SubsetInputError, match="missing column"):
        plan_subsets(
            DesignArgs(designs={"given": 0}), N, None, None, 0, given_table=pa.table({"id": [1]})
        )


def test_pack_roundtrip_and_big_bit_order():
    rng = np.random.default_rng(0)
    mask = rng.random((3, N)) < 0.3
    packed = pack_membership(mask)
    assert packed.shape == (3, math.ceil(N / 8))
    np.testing.assert_array_equal(unpack_membership(packed, N), mask)
    np.testing.assert_array_equal(members_of(packed[1], N), np.flatnonzero(mask[1]))
    assert pack_membership(np.array([True] + [False] * 7)).tolist() == [128]


def test_balanced_order_interleaves_designs():
    plan = plan_subsets(
        DesignArgs(designs={"mixture": 6, "uniform": 3, "within": 3}), N, CODES, DOMAINS, seed=0
    )
    order = balanced_order(plan)
    assert sorted(order.tolist()) == list(range(12))
    assert set(plan.design[order[:4]]) == {"mixture", "uniform", "within"}
