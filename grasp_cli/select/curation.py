"""The selections a data team would otherwise make, at the same budget: the curation check's baselines.

Every function returns sorted corpus row indices of exactly ``budget`` rows (``whole``: all
rows), drawn from a seed where the method samples. Pure functions of arrays; the select stage
feeds them and trains every selection with the same recipe and seeds.

- ``random_rows``: a uniform sample.
- ``domain_match_rows``: the budget spread evenly over the corpus domains the tasks come from
  (held-out domains), uniform within each — the obvious heuristic when targets are domains.
- ``regmix_rows``: RegMix (Liu et al., 2024): the domain-mixture regression fitted on the
  retrained subsets predicts the objective of many Dirichlet mixtures; the mean of the best
  ones is the mixture, sampled uniformly within domains.
- TRAK top-B (the top-B rows by an additive per-example score) is ``stage.streamed_top_rows``.
- DSIR lives in ``dsir.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def random_rows(n: int, budget: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, size=budget, replace=False))


def allocate_counts(shares: np.ndarray, available: np.ndarray, budget: int) -> np.ndarray:
    """Integer counts per domain ``[D]``: ``budget · shares`` by largest remainder, capped by
    ``available``, the excess handed to the other domains in proportion to their shares."""
    shares = np.asarray(shares, dtype=np.float64)
    available = np.asarray(available, dtype=np.int64)
    if available.sum() < budget:
        raise ValueError(f"budget {budget} exceeds the {int(available.sum())} rows available")
    counts = np.zeros(len(shares), dtype=np.int64)
    open_ = (available > 0) & (shares > 0)
    if not open_.any():
        open_ = available > 0
        shares = np.where(open_, 1.0, 0.0)
    while counts.sum() < budget:
        left = budget - counts.sum()
        weights = np.where(open_, shares, 0.0)
        if weights.sum() <= 0:  # every preferred domain is full: spread over the rest
            open_ = counts < available
            weights = open_.astype(np.float64)
        ideal = left * weights / weights.sum()
        step = np.floor(ideal).astype(np.int64)
        remainder = left - step.sum()
        order = np.argsort(-(ideal - step), kind="stable")
        step[order[:remainder]] += 1
        counts = np.minimum(counts + step, available)
        open_ &= counts < available
    return counts


def sample_within_domains(codes: np.ndarray, counts: np.ndarray, seed: int) -> np.ndarray:
    """``counts[d]`` rows drawn uniformly (without replacement) from each domain ``d``."""
    rng = np.random.default_rng(seed)
    chosen = []
    for d, count in enumerate(counts):
        if count:
            members = np.flatnonzero(codes == d)
            chosen.append(rng.choice(members, size=int(count), replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def domain_match_rows(
    codes: np.ndarray, task_domains: Sequence[int], budget: int, seed: int
) -> np.ndarray:
    """The budget split evenly over the task domains (codes), uniform within each."""
    n_domains = int(codes.max()) + 1 if len(codes) else 0
    available = np.bincount(codes, minlength=n_domains)
    shares = np.zeros(n_domains)
    shares[list(task_domains)] = 1.0
    return sample_within_domains(codes, allocate_counts(shares, available, budget), seed)


def regmix_mixture(
    coef: np.ndarray,
    weights: np.ndarray,
    available: np.ndarray,
    budget: int,
    alpha: float,
    seed: int,
    samples: int = 100_000,
    top: int = 100,
) -> np.ndarray:
    """RegMix's mixture ``[D]``: the mean of the ``top`` of ``samples`` Dirichlet(``alpha``)
    mixtures with the highest predicted objective ``w · (coef · mixture)``.

    coef: ``[D, T]`` the mixture regression's slope per domain and task (utilities per unit
    share); weights: ``[T]`` task weights of the objective (``w_t / σ_t``). Mixtures that ask
    a domain for more rows than it has are left out (the feasible ones are what can be
    trained on).
    """
    rng = np.random.default_rng(seed)
    n_domains = coef.shape[0]
    mixtures = rng.dirichlet(np.full(n_domains, alpha), size=samples)
    feasible = (mixtures * budget <= np.asarray(available)[None, :] + 1e-9).all(axis=1)
    if feasible.sum() >= top:
        mixtures = mixtures[feasible]
    predicted = mixtures @ (np.asarray(coef) @ np.asarray(weights))
    best = np.argsort(-predicted, kind="stable")[:top]
    return mixtures[best].mean(axis=0)


def regmix_rows(
    codes: np.ndarray,
    coef: np.ndarray,
    weights: np.ndarray,
    budget: int,
    alpha: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, mixture): RegMix's mixture, allocated and sampled uniformly within domains."""
    available = np.bincount(codes, minlength=coef.shape[0])
    mixture = regmix_mixture(coef, weights, available, budget, alpha, seed)
    sample_seed = int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])
    rows = sample_within_domains(codes, allocate_counts(mixture, available, budget), sample_seed)
    return rows, mixture


def repeated_share(row_keys: np.ndarray, rows: np.ndarray | None = None) -> tuple[int, float]:
    """(slots spent on repeats, share of the budget): rows of a selection (None: every row)
    whose content (its key, e.g. a hash of its tokens) another selected row already has."""
    keys = np.asarray(row_keys) if rows is None else np.asarray(row_keys)[np.asarray(rows)]
    repeats = len(keys) - len(np.unique(keys))
    return int(repeats), float(repeats / max(len(keys), 1))
