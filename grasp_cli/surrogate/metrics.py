"""Rank and linear correlations, and paired bootstrap confidence intervals.

Conventions: ties get average ranks; a constant input (no variance) has
correlation 0.0 — a predictor that cannot rank has no rank correlation. Inputs
must be finite.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "bootstrap_correlations",
    "bootstrap_paired_difference",
    "pearson",
    "rank_columns",
    "spearman",
]


def rank_columns(values: np.ndarray) -> np.ndarray:
    """1-based average ranks of each column of ``values`` ``[n, c]`` (or of a vector ``[n]``)."""
    arr = np.asarray(values, dtype=np.float64)
    squeeze = arr.ndim == 1
    if squeeze:
        arr = arr[:, None]
    n = arr.shape[0]
    if n == 0:
        return arr.copy()
    order = np.argsort(arr, axis=0, kind="stable")
    ordered = np.take_along_axis(arr, order, axis=0)
    positions = np.broadcast_to(np.arange(n)[:, None], arr.shape)
    starts = np.ones(arr.shape, dtype=bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    ends = np.ones(arr.shape, dtype=bool)
    ends[:-1] = starts[1:]
    first = np.maximum.accumulate(np.where(starts, positions, 0), axis=0)
    last = np.flip(
        np.minimum.accumulate(np.flip(np.where(ends, positions, n), axis=0), axis=0), axis=0
    )
    ranks = np.empty_like(arr)
    np.put_along_axis(ranks, order, 0.5 * (first + last) + 1.0, axis=0)
    return ranks[:, 0] if squeeze else ranks


def _check(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim not in (1, 2):
        raise ValueError(
            f"correlation inputs must have equal 1-D/2-D shapes, got {x.shape} and {y.shape}"
        )
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("correlation inputs contain non-finite values")
    return x, y


def _column_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson per column of ``[n, c]`` arrays; 0.0 where either column is constant."""
    xc = x - x.mean(axis=0)
    yc = y - y.mean(axis=0)
    sxx = np.einsum("ij,ij->j", xc, xc)
    syy = np.einsum("ij,ij->j", yc, yc)
    sxy = np.einsum("ij,ij->j", xc, yc)
    # Relative guards: round-off in a constant column must not look like variance.
    x_tol = 1e-24 * np.maximum(np.einsum("ij,ij->j", x, x), 1e-300)
    y_tol = 1e-24 * np.maximum(np.einsum("ij,ij->j", y, y), 1e-300)
    valid = (sxx > x_tol) & (syy > y_tol)
    out = np.zeros(x.shape[1])
    out[valid] = sxy[valid] / np.sqrt(sxx[valid] * syy[valid])
    return np.clip(out, -1.0, 1.0)


def pearson(x: np.ndarray, y: np.ndarray) -> float | np.ndarray:
    """Pearson correlation of vectors (float), or per column of ``[n, c]`` arrays."""
    x, y = _check(x, y)
    if x.ndim == 1:
        return float(_column_pearson(x[:, None], y[:, None])[0]) if x.size >= 2 else 0.0
    return _column_pearson(x, y) if x.shape[0] >= 2 else np.zeros(x.shape[1])


def spearman(x: np.ndarray, y: np.ndarray) -> float | np.ndarray:
    """Spearman rank correlation (average ranks for ties; constant input → 0.0).

    Vectors give a float; ``[n, c]`` arrays give one value per column.
    """
    x, y = _check(x, y)
    if x.ndim == 1:
        if x.size < 2:
            return 0.0
        return float(_column_pearson(rank_columns(x)[:, None], rank_columns(y)[:, None])[0])
    if x.shape[0] < 2:
        return np.zeros(x.shape[1])
    return _column_pearson(rank_columns(x), rank_columns(y))


def bootstrap_correlations(
    predicted: np.ndarray,
    measured: np.ndarray,
    *,
    n_boot: int,
    seed: int,
    level: float = 0.95,
    chunk: int = 200,
) -> dict[str, np.ndarray]:
    """Paired bootstrap of per-task Spearman and of its mean over tasks.

    predicted, measured: ``[E, T]`` over the same evaluation subsets. Each resample draws
    ``E`` subsets with replacement, jointly for all tasks (and, with the same seed, for
    every method). Returns ``{"low": [T], "high": [T], "mean_low": (), "mean_high": ()}``,
    the percentile interval at ``level``.
    """
    predicted, measured = _check(predicted, measured)
    if predicted.ndim == 1:
        predicted, measured = predicted[:, None], measured[:, None]
    n_eval, n_tasks = predicted.shape
    if n_boot <= 0 or n_eval < 2:
        point = spearman(predicted, measured) if n_eval >= 2 else np.zeros(n_tasks)
        return {
            "low": point,
            "high": point,
            "mean_low": np.mean(point),
            "mean_high": np.mean(point),
        }
    rng = np.random.default_rng(seed)
    draws = np.empty((n_boot, n_tasks))
    for lo in range(0, n_boot, chunk):
        size = min(chunk, n_boot - lo)
        idx = rng.integers(0, n_eval, size=(size, n_eval))
        pred = predicted[idx].transpose(1, 0, 2).reshape(n_eval, size * n_tasks)
        meas = measured[idx].transpose(1, 0, 2).reshape(n_eval, size * n_tasks)
        rho = _column_pearson(rank_columns(pred), rank_columns(meas))
        draws[lo : lo + size] = rho.reshape(size, n_tasks)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(draws, [alpha, 1.0 - alpha], axis=0)
    mean_low, mean_high = np.quantile(draws.mean(axis=1), [alpha, 1.0 - alpha])
    return {"low": low, "high": high, "mean_low": mean_low, "mean_high": mean_high}


def bootstrap_paired_difference(
    predicted_a: np.ndarray,
    predicted_b: np.ndarray,
    measured: np.ndarray,
    *,
    n_boot: int,
    seed: int,
    level: float = 0.95,
    chunk: int = 200,
) -> tuple[float, float, float]:
    """``(d, low, high)``: the difference ``d`` of mean-over-tasks Spearman, method A − method B,
    on the same evaluation subsets, with a *paired* percentile bootstrap interval.

    predicted_a, predicted_b, measured: ``[E, T]``. Each resample draws ``E`` subsets with
    replacement once and scores both methods on that same draw, so the interval is about the
    difference itself (the subsets both methods find hard or easy cancel), which is much
    narrower than comparing two separate intervals.
    """
    predicted_a, measured = _check(predicted_a, measured)
    predicted_b, _ = _check(predicted_b, measured)
    if measured.ndim == 1:
        predicted_a, predicted_b, measured = (
            v[:, None] for v in (predicted_a, predicted_b, measured)
        )
    n_eval, n_tasks = measured.shape
    point = float(
        np.mean(spearman(predicted_a, measured)) - np.mean(spearman(predicted_b, measured))
    )
    if n_boot <= 0 or n_eval < 2:
        return point, point, point
    rng = np.random.default_rng(seed)
    draws = np.empty(n_boot)
    for lo in range(0, n_boot, chunk):
        size = min(chunk, n_boot - lo)
        idx = rng.integers(0, n_eval, size=(size, n_eval))
        meas = rank_columns(measured[idx].transpose(1, 0, 2).reshape(n_eval, size * n_tasks))
        means = []
        for predicted in (predicted_a, predicted_b):
            pred = predicted[idx].transpose(1, 0, 2).reshape(n_eval, size * n_tasks)
            rho = _column_pearson(rank_columns(pred), meas).reshape(size, n_tasks)
            means.append(rho.mean(axis=1))
        draws[lo : lo + size] = means[0] - means[1]
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(draws, [alpha, 1.0 - alpha])
    return point, float(low), float(high)
