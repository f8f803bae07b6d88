"""Baselines evaluated on the very same subsets as GRASP.

Every baseline is a small estimator: ``fit(features, U_fit)`` on fit-role subsets,
``predict(features) -> [M, T]``, ``params() -> dict``. Their hyperparameters are
chosen by the same LCB protocol as GRASP's (see ``protocol.py``).

- additive alignment: ``GraspSurrogate(quadratic=False)`` (``b = 0``), in ``model.py``.
- ``TrakBaseline``: ``τ_i = φ_iᵀ (ΦᵀΦ + λ' I)⁻¹ r_t`` with ``λ' = λ · tr(ΦᵀΦ) / k'``,
  aggregated over ``S`` as a mean or a sum via the subset sums.
- ``GradientCosine``: LESS-style mean over ``S`` of ``cos(φ_i, r_t)``.
- ``Datamodels``: ridge on the membership indicator ``x_S ∈ {0,1}^N``, in the dual.
- ``DomainMixture``: ridge on each subset's domain proportions (RegMix-style).
- ``ConstantBaseline``: the fit mean (its Spearman is 0 by definition).

Score-type baselines (TRAK, cosine) are mapped to utility units by an affine map
``c_t + s_t · score`` fitted on the fit subsets with ``s_t > 0`` enforced: the
direction of a score is the method's claim, the fit subsets only choose the units.
All relative ridges are ``λ`` times a mean eigenvalue of the relevant Gram
matrix, so one ``λ`` grid is meaningful for every baseline.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from grasp_cli.surrogate.features import CorpusMoments, SubsetFeatures
from grasp_cli.surrogate.model import AGGREGATIONS, check_utilities, float_to_json

__all__ = [
    "ConstantBaseline",
    "Datamodels",
    "DomainMixture",
    "GradientCosine",
    "TrakBaseline",
    "ridge_solve",
]


def ridge_solve(gram: np.ndarray, rhs: np.ndarray, penalty: float) -> np.ndarray:
    """``(gram + penalty·I)⁺ rhs`` for a symmetric PSD ``gram``; pseudo-inverse when singular."""
    if penalty > 0:
        try:
            # Cholesky is several times cheaper than an eigendecomposition.
            factor = np.linalg.cholesky(gram + penalty * np.eye(gram.shape[0]))
            return np.linalg.solve(factor.T, np.linalg.solve(factor, rhs))
        except np.linalg.LinAlgError:
            pass
    evals, evecs = np.linalg.eigh(gram)
    shifted = evals + penalty
    top = max(float(np.abs(shifted).max(initial=0.0)), 1e-300)
    inv = np.where(shifted > 1e-12 * top, 1.0 / np.where(shifted > 0, shifted, 1.0), 0.0)
    return (
        evecs @ (inv[:, None] * (evecs.T @ rhs))
        if rhs.ndim == 2
        else evecs @ (inv * (evecs.T @ rhs))
    )


def _positive_affine(scores: np.ndarray, utilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per task ``(slope > 0, intercept)`` mapping scores ``[n, T]`` onto utilities ``[n, T]``."""
    n_tasks = utilities.shape[1]
    slope = np.zeros(n_tasks)
    intercept = np.zeros(n_tasks)
    for t in range(n_tasks):
        s, u = scores[:, t], utilities[:, t]
        sc, uc = s - s.mean(), u - u.mean()
        s_var = float(sc @ sc)
        if s_var > 0:
            slope[t] = float(sc @ uc) / s_var
            if slope[t] <= 0:
                # Keep the score's ranking: a vanishing positive slope.
                u_std = float(np.sqrt(uc @ uc / len(u)))
                slope[t] = 1e-9 * (u_std if u_std > 0 else 1.0) / math.sqrt(s_var / len(s))
        intercept[t] = float(u.mean() - slope[t] * s.mean())
    return slope, intercept


class _ScoreBaseline:
    """Shared fit/predict for baselines that score a subset without looking at utilities."""

    kind = "score"
    aggregation = "mean"

    def scores(self, features: SubsetFeatures) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _divisor(self, features: SubsetFeatures) -> np.ndarray:
        if self.aggregation == "mean":
            features.check_nonempty()
            return features.sizes[:, None]
        return np.full((len(features), 1), self.n_ref_)

    def fit(self, features: SubsetFeatures, utilities: np.ndarray) -> _ScoreBaseline:
        values = check_utilities(utilities, len(features), "fit utilities")
        self.n_ref_ = float(np.mean(features.sizes))
        self.slope_, self.intercept_ = _positive_affine(self.scores(features), values)
        return self

    def predict(self, features: SubsetFeatures) -> np.ndarray:
        return self.intercept_[None, :] + self.slope_[None, :] * self.scores(features)


class TrakBaseline(_ScoreBaseline):
    """TRAK's additive scores ``Σ_{i∈S} Q_i ψ_iᵀ (ΨᵀΨ + λ'I)⁻¹ ψ_t`` (÷|S| for 'mean').

    On the ``trak`` feature set (``features.sets["trak"]`` holds ``Σ_{i∈S} Q_i ψ_i`` and
    ``moments.kernel_gram`` is the unweighted ``ΨᵀΨ``) this is TRAK as published, θ0 only.
    On the ``sketch`` set it is the TRAK-style score of the loss-gradient sketches.
    residuals ``[T, k]`` (the task directions ``ψ_t``, or ``−r_t``); ridge: relative ``λ``
    (``λ' = λ tr/k'``; ``inf`` gives plain alignment); k_prime: feature prefix.
    """

    kind = "trak"

    def __init__(
        self,
        residuals: np.ndarray,
        moments: CorpusMoments,
        *,
        k_prime: int | None = None,
        ridge: float = 1e-3,
        aggregation: str = "mean",
        feature_set: str = "sketch",
        direction_cache: dict | None = None,
    ) -> None:
        """Store the hyperparameters; the kernel solve happens in ``fit`` (once per
        ``(feature set, k', λ)`` when the candidates share a ``direction_cache``: it depends on
        the corpus moments only, never on the fit subsets)."""
        self.residuals = np.atleast_2d(np.asarray(residuals, dtype=np.float64))
        self.moments = moments
        self.k_prime = int(self.residuals.shape[1] if k_prime is None else k_prime)
        self.ridge = float(ridge)
        self.aggregation = aggregation
        self.feature_set = feature_set
        self.direction_cache = direction_cache

    def fit(self, features: SubsetFeatures, utilities: np.ndarray) -> TrakBaseline:
        if not 0 < self.k_prime <= min(self.residuals.shape[1], self.moments.k):
            raise ValueError(f"TRAK: sketch prefix k'={self.k_prime} is out of range")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.aggregation!r}")
        key = ("trak", self.feature_set, self.k_prime, self.ridge)
        cache = self.direction_cache
        if cache is not None and key in cache:
            self.directions = cache[key].copy()
            return super().fit(features, utilities)
        r = self.residuals[:, : self.k_prime]
        if math.isinf(self.ridge):
            self.directions = r.copy()
        else:
            gram = self.moments.kernel_gram[: self.k_prime, : self.k_prime]
            penalty = self.ridge * float(np.trace(gram)) / self.k_prime
            self.directions = ridge_solve(gram, r.T, penalty).T  # [T, k']
        if cache is not None:
            cache[key] = self.directions.copy()
        return super().fit(features, utilities)

    def scores(self, features: SubsetFeatures) -> np.ndarray:
        sums = features.set_sums(self.feature_set)[:, : self.k_prime]
        return sums @ self.directions.T / self._divisor(features)

    def example_scores(self, rows: np.ndarray) -> np.ndarray:
        """Per-example scores ``[b, T]`` of feature rows ``[b, ≥k']`` (``Q_i ψ_i`` for 'trak')."""
        return np.asarray(rows, dtype=np.float64)[:, : self.k_prime] @ self.directions.T

    def params(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "features": self.feature_set,
            "k": self.k_prime,
            "ridge": float_to_json(self.ridge),
            "aggregation": self.aggregation,
        }


class ReferenceScores(_ScoreBaseline):
    """A reference implementation's per-example scores, summed over the subset (÷|S| for 'mean').

    ``features.sets[name]`` holds ``Σ_{i∈S} τ_i`` for ``L`` variants side by side
    (``[M, L·T]``; for ``trak-ref``: one per traker ``lambda_reg``); ``variant`` picks one.
    """

    kind = "reference"

    def __init__(self, name: str, variant: int, n_tasks: int, *, aggregation: str = "sum") -> None:
        self.name, self.variant, self.n_tasks = name, int(variant), int(n_tasks)
        self.aggregation = aggregation

    def fit(self, features: SubsetFeatures, utilities: np.ndarray) -> ReferenceScores:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.aggregation!r}")
        return super().fit(features, utilities)

    def scores(self, features: SubsetFeatures) -> np.ndarray:
        lo = self.variant * self.n_tasks
        return features.set_sums(self.name)[:, lo : lo + self.n_tasks] / self._divisor(features)

    def params(self) -> dict[str, Any]:
        return {"kind": self.name, "variant": self.variant, "aggregation": self.aggregation}


class GradientCosine(_ScoreBaseline):
    """LESS-style mean over ``S`` of ``cos(φ_i[:k'], r_t[:k'])``; needs ``normalized_sums[k']``."""

    kind = "cosine"

    def __init__(self, residuals: np.ndarray, *, k_prime: int, aggregation: str = "mean") -> None:
        self.residuals = np.atleast_2d(np.asarray(residuals, dtype=np.float64))
        self.k_prime = int(k_prime)
        self.aggregation = aggregation

    def fit(self, features: SubsetFeatures, utilities: np.ndarray) -> GradientCosine:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.aggregation!r}")
        residuals = self.residuals[:, : self.k_prime]
        norms = np.linalg.norm(residuals, axis=1, keepdims=True)
        self.unit_residuals = residuals / np.where(norms > 0, norms, 1.0)
        return super().fit(features, utilities)

    def scores(self, features: SubsetFeatures) -> np.ndarray:
        if self.k_prime not in features.normalized_sums:
            raise ValueError(
                f"gradient cosine needs normalized sums for k'={self.k_prime}; "
                "compute features with normalized_dims including it"
            )
        normalized = features.normalized_sums[self.k_prime]
        return normalized @ self.unit_residuals.T / self._divisor(features)

    def params(self) -> dict[str, Any]:
        return {"kind": self.kind, "k": self.k_prime, "aggregation": self.aggregation}


class Datamodels:
    """Ridge regression of utilities on membership ``x_S ∈ {0,1}^N`` (free intercept).

    Fitted in the dual: with ``K_jl = |S_j ∩ S_l|`` over fit subsets and ``K̃`` its
    doubly centered form, ``α = (K̃ + μI)⁻¹ (U − Ū)`` with ``μ = λ · tr(K̃) / n_fit``.
    Needs ``features.overlaps`` (global-id columns), so it predicts any subset
    whose overlaps with the fit subsets are known.
    """

    kind = "datamodels"

    def __init__(self, *, ridge: float = 1e-1) -> None:
        self.ridge = float(ridge)

    @staticmethod
    def _overlaps(features: SubsetFeatures, columns: np.ndarray) -> np.ndarray:
        if features.overlaps is None:
            raise ValueError(
                "datamodels need subset overlaps: compute features with with_overlaps=True"
            )
        return features.overlaps[:, columns]

    def fit(self, features: SubsetFeatures, utilities: np.ndarray) -> Datamodels:
        if not self.ridge >= 0 or math.isinf(self.ridge):
            raise ValueError(f"datamodels ridge must be finite and >= 0, got {self.ridge}")
        values = check_utilities(utilities, len(features), "fit utilities")
        self.fit_ids_ = features.index.copy()
        kernel = self._overlaps(features, self.fit_ids_)
        self.col_mean_ = kernel.mean(axis=0)
        self.all_mean_ = float(kernel.mean())
        centered = (
            kernel - kernel.mean(axis=1, keepdims=True) - self.col_mean_[None, :] + self.all_mean_
        )
        centered = 0.5 * (centered + centered.T)
        n = len(features)
        self.ridge_abs_ = self.ridge * float(np.trace(centered)) / n
        self.mean_ = values.mean(axis=0)
        self.dual_ = ridge_solve(centered, values - self.mean_, self.ridge_abs_)
        return self

    def predict(self, features: SubsetFeatures) -> np.ndarray:
        cross = self._overlaps(features, self.fit_ids_)
        centered = (
            cross - cross.mean(axis=1, keepdims=True) - self.col_mean_[None, :] + self.all_mean_
        )
        return self.mean_[None, :] + centered @ self.dual_

    def params(self) -> dict[str, Any]:
        return {"kind": self.kind, "ridge": float_to_json(self.ridge)}


class DomainMixture:
    """Ridge regression of utilities on domain proportions ``counts_S / |S|`` (RegMix-style).

    ``μ = λ · tr(P̃ᵀP̃) / D`` with ``P̃`` the centered fit proportions; free intercept.
    """

    kind = "regmix"

    def __init__(self, *, ridge: float = 1e-1) -> None:
        self.ridge = float(ridge)

    @staticmethod
    def _proportions(features: SubsetFeatures) -> np.ndarray:
        if features.domain_counts is None:
            raise ValueError("domain-mixture regression needs domain labels (domain_counts)")
        features.check_nonempty()
        return features.domain_counts / features.sizes[:, None]

    def fit(self, features: SubsetFeatures, utilities: np.ndarray) -> DomainMixture:
        if not self.ridge >= 0 or math.isinf(self.ridge):
            raise ValueError(f"mixture ridge must be finite and >= 0, got {self.ridge}")
        values = check_utilities(utilities, len(features), "fit utilities")
        props = self._proportions(features)
        self.x_mean_ = props.mean(axis=0)
        centered = props - self.x_mean_
        gram = centered.T @ centered
        self.ridge_abs_ = self.ridge * float(np.trace(gram)) / max(gram.shape[0], 1)
        self.mean_ = values.mean(axis=0)
        self.coef_ = ridge_solve(gram, centered.T @ (values - self.mean_), self.ridge_abs_)
        return self

    def predict(self, features: SubsetFeatures) -> np.ndarray:
        return self.mean_[None, :] + (self._proportions(features) - self.x_mean_) @ self.coef_

    def params(self) -> dict[str, Any]:
        return {"kind": self.kind, "ridge": float_to_json(self.ridge)}


class ConstantBaseline:
    """Predicts each task's fit mean for every subset (rank correlation 0 by definition)."""

    kind = "constant"

    def fit(self, features: SubsetFeatures, utilities: np.ndarray) -> ConstantBaseline:
        self.mean_ = check_utilities(utilities, len(features), "fit utilities").mean(axis=0)
        return self

    def predict(self, features: SubsetFeatures) -> np.ndarray:
        return np.broadcast_to(self.mean_, (len(features), self.mean_.shape[0])).copy()

    def params(self) -> dict[str, Any]:
        return {"kind": self.kind}
