"""The strictly finite lower-confidence-bound (LCB) protocol, method-agnostic.

A finite candidate set ``H`` is scored by repeated K-fold cross-validation on the
fit subsets only: every candidate is fitted on the training folds and gives one
Spearman value per validation fold and task. With ``n_h`` such values and their
mean, Hoeffding's inequality with a union bound over ``H`` gives

    LCB_h = mean_h − range · sqrt(log(|H| / δ) / (2 n_h)),     range = 2

(Spearman lies in [−1, 1]). The highest LCB wins; ties go to the simpler
candidate, as ranked by the caller's ``complexity`` key. Within one method every candidate
has the same ``n``, so this is the highest cross-validated mean.

Nested twins. A GRASP candidate with the quadratic term has a *twin* without it (same
features, direction, correction and aggregation, ``b = 0``): the model it extends. Fitting
``b ≥ 0`` lowers the in-sample error whenever it can, so a family that always carries the
term cannot fall back to the additive model even where cross-validation says the term
hurts. ``choose_nested`` therefore makes a quadratic candidate eligible only if it beats its
own twin on the same folds: with ``d_f`` the difference of their task-mean validation
Spearman on fold ``f`` (``n`` folds × repeats), the one-sided paired-t lower bound
``mean(d) − t_{1−α, n−1} · sd(d)/√n`` must be above 0, at ``α = δ / (number of quadratic
candidates)`` (a union bound, like the LCB's). Among eligible candidates (every twin is) the
highest LCB wins. The comparison is paired — fold-to-fold variation cancels — and it is
against exactly the nested model, not the best of a larger additive grid (which would inherit
a winner's curse). Repeated K-fold reuses subsets across repeats, so the t bound is
approximate (optimistic); the union bound makes up for part of that.

Nothing here sees evaluation subsets: functions take the fit arrays only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from grasp_cli.surrogate.features import SubsetFeatures
from grasp_cli.surrogate.metrics import spearman

__all__ = [
    "CandidateScore",
    "Estimator",
    "choose_candidate",
    "choose_nested",
    "student_t_quantile",
    "twin_of",
    "cross_validate",
    "effective_folds",
    "hoeffding_lcb",
    "repeated_kfold",
    "score_candidates",
]

SPEARMAN_RANGE = 2.0
MIN_FIT_SUBSETS = 4


class Estimator(Protocol):
    def fit(self, features: SubsetFeatures, utilities: np.ndarray) -> Any: ...

    def predict(self, features: SubsetFeatures) -> np.ndarray: ...


@dataclass
class CandidateScore:
    """One candidate's cross-validated Spearman values and its bound.

    fold_values: ``[folds, T]`` validation Spearman per fold (rows of failed folds are NaN);
    ``values``: the finite ones, flattened. ``eligible``: whether the selection rule may pick
    it (a quadratic candidate that does not beat its nested twin is not).
    """

    candidate: dict[str, Any]
    values: np.ndarray
    mean: float
    lcb: float
    failures: int = 0
    fold_values: np.ndarray | None = None
    eligible: bool = True
    twin_gain: float | None = None  # paired-t lower bound of the gain over the nested twin

    @property
    def n(self) -> int:
        return int(self.values.size)

    def fold_means(self) -> np.ndarray:
        """Validation Spearman averaged over tasks, per fold (NaN where the fold failed)."""
        if self.fold_values is None:
            return np.zeros(0)
        return self.fold_values.mean(axis=1)


def hoeffding_lcb(
    mean: float, n: int, n_candidates: int, delta: float, value_range: float = SPEARMAN_RANGE
) -> float:
    """``mean − range · sqrt(log(|H|/δ) / (2n))``; ``-inf`` when ``n = 0``."""
    if not 0 < delta < 1:
        raise ValueError(f"LCB failure probability δ must lie in (0, 1), got {delta}")
    if n <= 0:
        return -math.inf
    return float(mean - value_range * math.sqrt(math.log(max(n_candidates, 1) / delta) / (2.0 * n)))


def effective_folds(n_items: int, folds: int) -> int:
    """K actually used: at most ``n_items // 3`` (≥ 3 subsets per validation fold), at least 2."""
    if n_items < MIN_FIT_SUBSETS:
        raise ValueError(
            f"cross-validation needs at least {MIN_FIT_SUBSETS} fit subsets, got {n_items}"
        )
    return max(2, min(int(folds), n_items // 3))


def repeated_kfold(
    n_items: int, folds: int, repeats: int, seed: int, eligible: np.ndarray | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train, validation)`` position arrays for ``repeats`` seeded shuffles of K-fold.

    ``eligible`` (bool ``[n_items]``, default all): the items that may be validation items.
    The others are always trained on — subsets chosen adaptively (the closed loop's, near an
    earlier selection) are not draws from the subset design the validation score estimates,
    so they inform every fit but never score one. All eligible gives exactly the plain splits.
    """
    pool = np.arange(n_items) if eligible is None else np.flatnonzero(eligible)
    if len(pool) == 0:
        raise ValueError("no subsets may be validation subsets")
    k = effective_folds(len(pool), folds)
    rng = np.random.default_rng(seed)
    splits = []
    everything = np.arange(n_items)
    for _ in range(max(int(repeats), 1)):
        order = pool[rng.permutation(len(pool))]
        for val in np.array_split(order, k):
            train = np.setdiff1d(everything, val, assume_unique=True)
            splits.append((np.sort(train), np.sort(val)))
    return splits


def cross_validate(
    build: Callable[[dict[str, Any]], Estimator],
    candidate: dict[str, Any],
    features: SubsetFeatures,
    utilities: np.ndarray,
    splits: Sequence[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, int]:
    """Per-fold, per-task validation Spearman of one candidate → (values ``[folds, T]``, failures).

    A fold whose fit raises a numerical error (``ValueError``/``LinAlgError``) or predicts a
    non-finite value gives a row of NaN and counts as a failure.
    """
    n_tasks = np.atleast_2d(np.asarray(utilities)).shape[1] if np.ndim(utilities) > 1 else 1
    values = np.full((len(splits), n_tasks), np.nan)
    failures = 0
    for f, (train, val) in enumerate(splits):
        try:
            model = build(candidate)
            model.fit(features.take(train), utilities[train])
            predicted = model.predict(features.take(val))
        except (ValueError, np.linalg.LinAlgError):
            failures += 1
            continue
        if not np.isfinite(predicted).all():
            failures += 1
            continue
        values[f] = np.atleast_1d(spearman(predicted, utilities[val]))
    return values, failures


def score_candidates(
    build: Callable[[dict[str, Any]], Estimator],
    grid: Sequence[dict[str, Any]],
    features: SubsetFeatures,
    utilities: np.ndarray,
    splits: Sequence[tuple[np.ndarray, np.ndarray]],
    delta: float,
) -> list[CandidateScore]:
    """Cross-validate every candidate of a finite grid and attach its Hoeffding LCB."""
    scores = []
    for candidate in grid:
        fold_values, failures = cross_validate(build, candidate, features, utilities, splits)
        values = fold_values[np.isfinite(fold_values)]
        mean = float(values.mean()) if values.size else float("nan")
        lcb = hoeffding_lcb(mean, values.size, len(grid), delta) if values.size else -math.inf
        scores.append(CandidateScore(dict(candidate), values, mean, lcb, failures, fold_values))
    return scores


def twin_of(candidate: dict[str, Any]) -> dict[str, Any] | None:
    """The nested twin of a quadratic candidate (the same without the quadratic term); None
    for a candidate without one (not a GRASP candidate, or already additive)."""
    if not candidate.get("quadratic"):
        return None
    return {**candidate, "quadratic": False, "geometry": None}


def _key(candidate: dict[str, Any]) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in candidate.items()))


def mark_nested_eligibility(scores: Sequence[CandidateScore], delta: float) -> None:
    """Set ``eligible`` / ``twin_gain`` of every quadratic candidate from the paired test
    against its nested twin (see the module docstring). Candidates without a twin in the
    grid stay eligible (the family has no additive members to fall back to)."""
    index = {_key(s.candidate): s for s in scores}
    quadratic = [s for s in scores if twin_of(s.candidate) is not None]
    paired = [(s, index.get(_key(twin_of(s.candidate)))) for s in quadratic]
    paired = [(s, t) for s, t in paired if t is not None]
    if not paired:
        return
    alpha = delta / len(paired)
    for score, twin in paired:
        diff = score.fold_means() - twin.fold_means()
        diff = diff[np.isfinite(diff)]
        if len(diff) < 2:
            score.eligible, score.twin_gain = False, None
            continue
        spread = float(np.std(diff, ddof=1)) / math.sqrt(len(diff))
        bound = float(diff.mean()) - student_t_quantile(1.0 - alpha, len(diff) - 1) * spread
        score.twin_gain = bound
        score.eligible = bound > 0.0


def choose_nested(
    scores: Sequence[CandidateScore], complexity: Callable[[dict[str, Any]], tuple], delta: float
) -> int:
    """The highest LCB among the eligible candidates after the nested-twin test."""
    mark_nested_eligibility(scores, delta)
    eligible = [s if s.eligible else None for s in scores]
    masked = [
        CandidateScore(s.candidate, s.values, s.mean, s.lcb if s.eligible else -math.inf)
        for s in scores
    ]
    if not any(e is not None and np.isfinite(e.lcb) for e in eligible):
        return choose_candidate(scores, complexity)
    return choose_candidate(masked, complexity)


def student_t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF)."""
    if not 0.5 <= p < 1.0 or df < 1:
        raise ValueError(f"need 0.5 <= p < 1 and df >= 1, got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _t_cdf(t: float, df: int) -> float:
    """P(T <= t) for t >= 0: 1 − I_{df/(df+t²)}(df/2, 1/2) / 2 (regularized incomplete beta)."""
    x = df / (df + t * t)
    return 1.0 - 0.5 * _betainc(0.5 * df, 0.5, x)


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) by its continued fraction (Lentz's method)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    log_front += a * math.log(x) + b * math.log1p(-x)
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on the other side
        return 1.0 - _betainc(b, a, 1.0 - x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * result / a


def choose_candidate(
    scores: Sequence[CandidateScore], complexity: Callable[[dict[str, Any]], tuple]
) -> int:
    """Index of the highest LCB; ties (within 1e-12) go to the smallest ``complexity`` key."""
    if not scores:
        raise ValueError("the candidate grid is empty")
    lcbs = np.array([s.lcb for s in scores])
    if not np.isfinite(lcbs).any():
        raise ValueError("no candidate could be fitted on any cross-validation fold")
    best = float(np.max(lcbs))
    tied = [i for i, s in enumerate(scores) if s.lcb >= best - 1e-12]
    return min(tied, key=lambda i: (complexity(scores[i].candidate), i))
