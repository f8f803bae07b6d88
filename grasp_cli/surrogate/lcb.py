"""The strictly finite lower-confidence-bound (LCB) protocol, method-agnostic.

A finite candidate set ``H`` is scored by repeated K-fold cross-validation on the
fit subsets only: every candidate is fitted on the training folds and gives one
Spearman value per validation fold and task. With ``n_h`` such values and their
mean, Hoeffding's inequality with a union bound over ``H`` gives

    LCB_h = mean_h − range · sqrt(log(|H| / δ) / (2 n_h)),     range = 2

(Spearman lies in [−1, 1]). The highest LCB wins; ties go to the simpler
candidate, as ranked by the caller's ``complexity`` key.

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
    """One candidate's cross-validated Spearman values (per fold × task) and its bound."""

    candidate: dict[str, Any]
    values: np.ndarray
    mean: float
    lcb: float
    failures: int = 0

    @property
    def n(self) -> int:
        return int(self.values.size)


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
    n_items: int, folds: int, repeats: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train, validation)`` position arrays for ``repeats`` seeded shuffles of K-fold."""
    k = effective_folds(n_items, folds)
    rng = np.random.default_rng(seed)
    splits = []
    for _ in range(max(int(repeats), 1)):
        order = rng.permutation(n_items)
        for val in np.array_split(order, k):
            train = np.setdiff1d(order, val, assume_unique=True)
            splits.append((np.sort(train), np.sort(val)))
    return splits


def cross_validate(
    build: Callable[[dict[str, Any]], Estimator],
    candidate: dict[str, Any],
    features: SubsetFeatures,
    utilities: np.ndarray,
    splits: Sequence[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, int]:
    """Per-fold, per-task validation Spearman of one candidate → (values ``[n]``, failures).

    A fold whose fit raises a numerical error (``ValueError``/``LinAlgError``) contributes no
    values and counts as a failure; the bound then rests on fewer values.
    """
    values: list[np.ndarray] = []
    failures = 0
    for train, val in splits:
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
        values.append(np.atleast_1d(spearman(predicted, utilities[val])))
    return (np.concatenate(values) if values else np.zeros(0)), failures


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
        values, failures = cross_validate(build, candidate, features, utilities, splits)
        mean = float(values.mean()) if values.size else float("nan")
        lcb = hoeffding_lcb(mean, values.size, len(grid), delta) if values.size else -math.inf
        scores.append(CandidateScore(dict(candidate), values, mean, lcb, failures))
    return scores


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
