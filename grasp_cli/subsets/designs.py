"""Subset designs: which subsets S of the corpus ``retrain-subsets`` trains on.

Every sampled subset is a pure function of ``(seed, design, k)``, ``k`` being its
position within its design, so the ``k``-th mixture subset is the same whatever the
other counts are, and a SLURM array task can rebuild any subset (``sample_subset``)
without talking to the others. Designs:

- ``uniform``: keep each example independently with probability ``uniform_alpha``.
- ``mixture``: weights ``w ~ Dirichlet(dirichlet_alpha)`` over the corpus's (non-empty)
  domains and a size ``n ~ U{ceil(size_min·N) .. floor(size_max·N)}``; domain d gets
  ``n·w_d`` examples, capped by what it has, with the excess handed to the other domains
  in proportion to their weights; examples are drawn without replacement within domains.
- ``within``: fixed size ``n = round((size_min + size_max)/2 · N)`` split over domains
  at the corpus's own proportions, examples uniform within each domain: the mixture
  stays put, only which examples varies.
- ``given``: subsets read from a table ``(subset_id, id[, role])``.

Roles. A sampled subset is "eval" when its own role draw ``u(seed, design, k) <
eval_fraction``, else "fit". Within a design of M_d subsets the plan then guarantees at
least ``max(3, floor(eval_fraction·M_d/2))`` eval and ``max(3, floor((1-eval_fraction)·M_d/2))``
fit subsets when ``M_d >= 6`` (one of each when ``2 <= M_d < 6``), and at least 3 of each
over all sampled subsets when there are 6 or more. When a guarantee has to act, it flips
the subsets whose role draw lies closest to the threshold, so only then does a role
depend on the counts; membership never does. Given subsets keep the file's role, or
"given". Global subset ids run 0..M-1 through the designs in the fixed order
``DESIGN_ORDER``, each design's subsets in ``k`` order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from grasp_cli.artifacts.subsets import (
    members_of,
    pack_membership,
    read_subset_table,
    unpack_membership,
)

DESIGN_ORDER = ("mixture", "uniform", "within", "given")
SAMPLED_DESIGNS = DESIGN_ORDER[:3]
_DESIGN_CODE = {"mixture": 1, "uniform": 2, "within": 3}
_ROLE_STREAM = 0x5EED


# Membership packing and the (subset_id, id[, role]) table reader live with the on-disk format.


# ---------------------------------------------------------------- the plan


@dataclass
class SubsetPlan:
    """M subsets of a corpus of N examples; row j describes subset id j.

    membership: uint8 ``[M, ceil(N/8)]`` bit-packed (big bit order); sizes: int64 ``[M]``;
    roles / design: str ``[M]`` ("fit" | "eval" | "given"; design name);
    params: ``[M]`` JSON strings with what the design drew (e.g. Dirichlet weights).
    """

    membership: np.ndarray
    sizes: np.ndarray
    roles: np.ndarray
    design: np.ndarray
    params: list[str]
    n_examples: int
    seed: int

    def __len__(self) -> int:
        return int(self.sizes.shape[0])

    @property
    def subset_ids(self) -> np.ndarray:
        return np.arange(len(self), dtype=np.int64)

    def mask(self, subset_id: int) -> np.ndarray:
        """bool ``[N]``: which examples subset ``subset_id`` holds."""
        return unpack_membership(self.membership[subset_id], self.n_examples)

    def members(self, subset_id: int) -> np.ndarray:
        """Sorted int64 row indices of subset ``subset_id``."""
        return members_of(self.membership[subset_id], self.n_examples)


@dataclass(frozen=True)
class DesignArgs:
    """The design knobs of ``SubsetsSection`` (any object with these attributes works)."""

    designs: Mapping[str, int]
    eval_fraction: float = 0.35
    uniform_alpha: float = 0.5
    dirichlet_alpha: float = 0.5
    size_min: float = 0.1
    size_max: float = 0.5
    given: str = ""


class DomainLayout:
    """Domain layout of a corpus of N examples: the sorted rows of each non-empty domain.

    ``domain_codes``: int ``[N]`` indexing ``domain_names`` (``None``: one domain, "all").
    """

    def __init__(
        self, n_examples: int, domain_codes: np.ndarray | None, domain_names: Sequence[str] | None
    ):
        if n_examples <= 0:
            raise ValueError("the corpus is empty")
        if domain_codes is None:
            domain_codes = np.zeros(n_examples, dtype=np.int8)
            domain_names = ["all"]
        domain_codes = np.asarray(domain_codes)  # any integer codes: no [N] int64 copy
        if not np.issubdtype(domain_codes.dtype, np.integer):
            raise ValueError(f"domain_codes must be integers, got {domain_codes.dtype}")
        if domain_codes.shape != (n_examples,):
            raise ValueError(
                f"domain_codes has shape {domain_codes.shape}, expected ({n_examples},)"
            )
        names = (
            list(domain_names)
            if domain_names is not None
            else [str(c) for c in range(domain_codes.max() + 1)]
        )
        if domain_codes.min() < 0 or domain_codes.max() >= len(names):
            raise ValueError(f"domain_codes must lie in [0, {len(names)})")
        order = np.argsort(domain_codes, kind="stable")
        if n_examples < 2**31:  # row indices in 4 bytes, not 8
            order = order.astype(np.int32)
        counts = np.bincount(domain_codes, minlength=len(names))
        splits = np.split(order, np.cumsum(counts)[:-1])
        present = [c for c in range(len(names)) if counts[c] > 0]
        self.n = n_examples
        self.names = [names[c] for c in present]
        self.rows = [splits[c] for c in present]  # sorted row indices of each present domain
        self.counts = counts[present].astype(np.int64)


def _rng(seed: int, design: str, k: int, stream: int = 0) -> np.random.Generator:
    if seed < 0:
        raise ValueError(f"design seed must be non-negative, got {seed}")
    return np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([seed, _DESIGN_CODE[design], k, stream]))
    )


def _size_range(args: Any, n: int) -> tuple[int, int]:
    if not 0.0 < args.size_min <= args.size_max <= 1.0:
        raise ValueError(
            f"need 0 < size_min <= size_max <= 1, got {args.size_min}, {args.size_max}"
        )
    low = max(1, math.ceil(args.size_min * n))
    return low, max(low, math.floor(args.size_max * n))


def _largest_remainder(amounts: np.ndarray, total: int) -> np.ndarray:
    """Integers summing to ``total`` that round ``amounts`` (which sum to ``total``)."""
    floors = np.floor(amounts + 1e-9).astype(np.int64)
    short = total - int(floors.sum())
    if short > 0:
        order = np.argsort(-(amounts - floors), kind="stable")
        floors[order[:short]] += 1
    return floors


def allocate(size: int, weights: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Split ``size`` over domains in proportion to ``weights``, at most ``capacity[d]`` each.

    Domains that would overflow get their capacity; the excess goes to the others in
    proportion to their weights (to their capacities if their weights are all zero).
    Returns int64 counts summing to ``min(size, capacity.sum())``.
    """
    capacity = np.asarray(capacity, dtype=np.int64)
    size = min(int(size), int(capacity.sum()))
    amounts = np.zeros(len(capacity), dtype=np.float64)
    open_ = capacity > 0
    remaining = float(size)
    while remaining > 1e-9 and open_.any():
        basis = np.where(open_, weights, 0.0)
        if basis.sum() <= 0:
            basis = np.where(open_, capacity - amounts, 0.0)
        share = remaining * basis / basis.sum()
        full = open_ & (amounts + share >= capacity - 1e-9)
        if not full.any():
            amounts += share
            break
        remaining -= float((capacity - amounts)[full].sum())
        amounts[full] = capacity[full]
        open_ &= ~full
    counts = _largest_remainder(amounts, size)
    return np.minimum(counts, capacity)


def _draw_within_domains(
    rng: np.random.Generator, layout: DomainLayout, counts: np.ndarray
) -> np.ndarray:
    mask = np.zeros(layout.n, dtype=bool)
    for rows, count in zip(layout.rows, counts, strict=True):
        if count:
            mask[rng.choice(rows, size=int(count), replace=False)] = True
    return mask


def sample_subset(
    design: str, k: int, args: Any, layout: DomainLayout, seed: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """Membership bool ``[N]`` and drawn parameters of the ``k``-th subset of a sampled design."""
    rng = _rng(seed, design, k)
    if design == "uniform":
        if not 0.0 < args.uniform_alpha <= 1.0:
            raise ValueError(f"uniform_alpha must lie in (0, 1], got {args.uniform_alpha}")
        mask = rng.random(layout.n) < args.uniform_alpha
        if not mask.any():  # tiny corpora: never hand the trainer an empty subset
            mask[rng.integers(layout.n)] = True
        return mask, {"alpha": args.uniform_alpha}
    if design == "mixture":
        if args.dirichlet_alpha <= 0:
            raise ValueError(f"dirichlet_alpha must be positive, got {args.dirichlet_alpha}")
        weights = rng.dirichlet(np.full(len(layout.names), float(args.dirichlet_alpha)))
        low, high = _size_range(args, layout.n)
        size = int(rng.integers(low, high + 1))
        counts = allocate(size, weights, layout.counts)
        params = {
            "target_size": size,
            "weights": {
                name: round(float(w), 6) for name, w in zip(layout.names, weights, strict=True)
            },
            "counts": {name: int(c) for name, c in zip(layout.names, counts, strict=True)},
        }
        return _draw_within_domains(rng, layout, counts), params
    if design == "within":
        _size_range(args, layout.n)  # validates the range
        size = min(layout.n, max(1, round((args.size_min + args.size_max) / 2 * layout.n)))
        counts = _largest_remainder(size * layout.counts / layout.n, size)
        counts = np.minimum(counts, layout.counts)
        return _draw_within_domains(rng, layout, counts), {"size": size}
    raise ValueError(
        f"unknown sampled design {design!r} (choose from {', '.join(SAMPLED_DESIGNS)})"
    )


def _role_draws(seed: int, design: str, count: int) -> np.ndarray:
    return np.array([_rng(seed, design, k, _ROLE_STREAM).random() for k in range(count)])


def _enforce(
    draws: np.ndarray, is_eval: np.ndarray, threshold: float, min_eval: int, min_fit: int
) -> None:
    """Flip roles in place (closest draws to ``threshold`` first) until both minima hold."""
    missing_eval = min_eval - int(is_eval.sum())
    if missing_eval > 0:
        candidates = np.flatnonzero(~is_eval)
        is_eval[candidates[np.argsort(draws[candidates], kind="stable")[:missing_eval]]] = True
    missing_fit = min_fit - int((~is_eval).sum())
    if missing_fit > 0:
        candidates = np.flatnonzero(is_eval)
        is_eval[candidates[np.argsort(-draws[candidates], kind="stable")[:missing_fit]]] = False


def _minima(count: int, eval_fraction: float) -> tuple[int, int]:
    if count >= 6:
        return max(3, int(eval_fraction * count / 2)), max(3, int((1 - eval_fraction) * count / 2))
    if count >= 2:
        return 1, 1
    return 0, 0


def assign_roles(
    counts: Mapping[str, int], eval_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Role ("fit"/"eval") of each sampled subset, per design, with the guarantees above."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must lie in (0, 1), got {eval_fraction}")
    draws = {d: _role_draws(seed, d, counts[d]) for d in SAMPLED_DESIGNS if counts.get(d, 0) > 0}
    is_eval = {d: u < eval_fraction for d, u in draws.items()}
    for d, u in draws.items():
        _enforce(u, is_eval[d], eval_fraction, *_minima(len(u), eval_fraction))
    if draws:
        all_draws = np.concatenate(list(draws.values()))
        all_eval = np.concatenate(list(is_eval.values()))
        total = len(all_draws)
        if total >= 6:
            _enforce(all_draws, all_eval, eval_fraction, 3, 3)
            for d, part in zip(
                draws,
                np.split(all_eval, np.cumsum([len(u) for u in draws.values()])[:-1]),
                strict=True,
            ):
                is_eval[d] = part
    return {d: np.where(e, "eval", "fit") for d, e in is_eval.items()}


# ---------------------------------------------------------------- combining designs


def plan_subsets(
    args: Any,
    corpus: int | np.ndarray,
    domain_codes: np.ndarray | None,
    domain_names: Sequence[str] | None,
    seed: int,
    ids: np.ndarray | None = None,
    given_table: Any = None,
    given_path: str | Path | None = None,
) -> SubsetPlan:
    """All subsets of ``args.designs`` (design -> count), ids 0..M-1 in ``DESIGN_ORDER``.

    ``args``: a ``SubsetsSection`` or ``DesignArgs``. ``corpus``: N, or the corpus ids
    ``[N]`` (row i has id ``ids[i]``; the given design maps its ids through them — same as
    passing ``ids``; default ``arange(N)``). ``domain_codes``: int ``[N]`` indexing
    ``domain_names`` (``None``: one domain). ``seed``: the design seed (non-negative).
    Given design: read from ``given_table`` (a pyarrow Table) if set, else from
    ``given_path`` or ``args.given`` (Parquet); ``given_path`` also names the source in
    errors. Its count caps how many of the file's subsets are taken (0 = all).
    """
    if isinstance(corpus, (int, np.integer)):
        n_examples = int(corpus)
    else:
        ids = np.asarray(corpus) if ids is None else ids
        n_examples = len(corpus)
    unknown = set(args.designs) - set(DESIGN_ORDER)
    if unknown:
        raise ValueError(
            f"unknown design(s) {', '.join(sorted(unknown))}; choose from {', '.join(DESIGN_ORDER)}"
        )
    counts = {d: int(args.designs.get(d, 0)) for d in DESIGN_ORDER}
    if any(counts[d] < 0 for d in SAMPLED_DESIGNS):
        raise ValueError(f"design counts must be non-negative: {dict(args.designs)}")
    layout = DomainLayout(n_examples, domain_codes, domain_names)
    roles_by_design = assign_roles(counts, args.eval_fraction, seed)
    rows: list[np.ndarray] = []
    sizes: list[int] = []
    roles: list[str] = []
    design: list[str] = []
    params: list[str] = []
    for name in SAMPLED_DESIGNS:
        for k in range(counts[name]):
            mask, drawn = sample_subset(name, k, args, layout, seed)
            rows.append(pack_membership(mask))
            sizes.append(int(mask.sum()))
            roles.append(str(roles_by_design[name][k]))
            design.append(name)
            params.append(json.dumps({"k": k, **drawn}, sort_keys=True))
    if "given" in args.designs:
        path = given_path or getattr(args, "given", "")
        source = given_table if given_table is not None else path
        if source is None or (isinstance(source, str) and not source):
            raise ValueError(
                "the 'given' design needs subsets.given (a Parquet file of subset_id, id[, role])"
            )
        corpus_ids = np.arange(n_examples, dtype=np.int64) if ids is None else np.asarray(ids)
        if len(corpus_ids) != n_examples:
            raise ValueError(f"ids has {len(corpus_ids)} entries for a corpus of {n_examples}")
        masks, given_roles, given_params, _ = read_subset_table(
            source, corpus_ids, counts["given"], where=str(path) if path else None
        )
        for mask, role, drawn in zip(masks, given_roles, given_params, strict=True):
            rows.append(pack_membership(mask))
            sizes.append(int(mask.sum()))
            roles.append(role)
            design.append("given")
            params.append(json.dumps(drawn, sort_keys=True))
    width = (n_examples + 7) // 8
    return SubsetPlan(
        membership=np.stack(rows) if rows else np.zeros((0, width), dtype=np.uint8),
        sizes=np.asarray(sizes, dtype=np.int64),
        roles=np.asarray(roles, dtype=object).astype(str) if roles else np.zeros(0, dtype="<U5"),
        design=np.asarray(design, dtype=str) if design else np.zeros(0, dtype="<U7"),
        params=params,
        n_examples=n_examples,
        seed=seed,
    )


def balanced_order(plan: SubsetPlan | np.ndarray) -> np.ndarray:
    """Subset ids interleaved across designs (each design's subsets spread evenly), so that a
    prefix (``--limit M``) holds every design in proportion. A permutation of the subset ids.

    ``plan``: a ``SubsetPlan`` or just its ``design`` array ``[M]``.
    """
    design = np.asarray(plan.design if isinstance(plan, SubsetPlan) else plan)
    keys = np.zeros(len(design))
    for name in np.unique(design):
        members = np.flatnonzero(design == name)
        keys[members] = (np.arange(len(members)) + 0.5) / len(members)
    return np.lexsort((np.arange(len(design)), keys)).astype(np.int64)
