"""The GRASP surrogate: a fitted smoothness lower bound per task.

    Û_t(S) = c_t + a_t ⟨r_t + Δ_t, m_S⟩ − (b_t / 2) ‖m_S‖²_G,     a_t ≥ 0, b_t ≥ 0

``m_S`` is the subset's sketch prefix aggregate: the mean ``Σ_{i∈S} φ_i[:k'] / |S|``
(aggregation ``mean``) or the sum scaled by a reference size,
``Σ_{i∈S} φ_i[:k'] / n_ref`` with ``n_ref`` the mean fit-subset size (aggregation
``sum``; the scaling keeps the two forms on comparable scales).

How it is fitted (exactly, per task, no alternation)
----------------------------------------------------
Write the correction as ``w_t = a_t Δ_t`` (its contribution to the linear term).
The fit minimizes over ``c_t`` (free), ``a_t ≥ 0``, ``b_t ≥ 0`` and ``w_t``

    Σ_S (U_t(S) − Û_t(S))² + μ ‖w_t‖²,      μ = λ · tr(M̃ᵀM̃) / k',

with ``M̃`` the centered ``[n_fit, k']`` matrix of fit-subset aggregates. This is a
convex quadratic program. ``c`` and ``w`` enter as a ridge regression, so they
are profiled out in closed form (one SVD of ``M̃`` shared by all tasks); what
remains is a 2-variable nonnegative least-squares problem in ``(a, b)``, solved
exactly by enumerating the active sets of the two constraints. The reported
``Δ_t = w_t / a_t`` (undefined when ``a_t = 0``; then the correction alone
carries the linear term).

Scale-free ridge. ``μ`` is ``λ`` times the mean eigenvalue of the design Gram
``M̃ᵀM̃``: equivalently, after rescaling utilities and aggregates to unit average
variance, the penalty on the standardized coefficient is ``λ · n_fit``. So the
same ``λ`` grid means the same amount of shrinkage whatever the sketch scale,
the utility scale or ``k'``; ``λ = ∞`` means no correction (``Δ = 0``).
Penalizing ``a_tΔ_t`` rather than ``Δ_t`` is what makes the joint problem convex
(a unique global optimum); at a fixed ``a_t`` the two penalties differ only by
the constant factor ``a_t²``.

``quadratic=False`` fixes ``b = 0``: the additive-alignment baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np

from grasp_cli.surrogate.features import CorpusMoments, SubsetFeatures
from grasp_cli.surrogate.geometry import geometry_matrix, is_diagonal, sq_norm

__all__ = [
    "AGGREGATIONS",
    "GraspSurrogate",
    "check_utilities",
    "float_from_json",
    "float_to_json",
    "subset_aggregates",
]

AGGREGATIONS = ("mean", "sum")
ALIGNMENTS = ("plain", "natural", "kernel")
NATURAL_DAMPING = (
    1e-2  # damping of the sketched Gauss–Newton metric, relative to its mean eigenvalue
)


def natural_direction(directions: np.ndarray, moments: CorpusMoments | None) -> np.ndarray:
    """Precondition task directions ``[T, k']`` by the damped sketched Gauss–Newton metric.

    ``(C + εI)⁻¹ r`` with ``C = ΦᵀΦ/N`` on the prefix and ``ε = NATURAL_DAMPING · tr(C)/k'``:
    the natural-gradient (TRAK-like, whitened) task direction, so that alignment is measured
    in the geometry of the corpus's own gradients rather than in raw sketch coordinates.
    Each row is rescaled to its original norm, keeping ``a_t`` and ``λ`` on the usual scale.
    """
    if moments is None:
        raise ValueError("alignment 'natural' needs the corpus moments")
    k_prime = directions.shape[1]
    metric = moments.second_moment[:k_prime, :k_prime]
    damping = NATURAL_DAMPING * float(np.trace(metric)) / k_prime
    solved = np.linalg.solve(metric + damping * np.eye(k_prime), directions.T).T
    norms = np.linalg.norm(directions, axis=1, keepdims=True)
    solved_norms = np.linalg.norm(solved, axis=1, keepdims=True)
    return solved * np.where(
        solved_norms > 0, norms / np.where(solved_norms > 0, solved_norms, 1), 0
    )


def float_to_json(value: float) -> float | str:
    """JSON has no infinity: write ``inf`` as the string ``"inf"``."""
    return "inf" if math.isinf(value) and value > 0 else float(value)


def float_from_json(value: float | str) -> float:
    return float("inf") if value == "inf" else float(value)


def check_utilities(utilities: np.ndarray, n_subsets: int, what: str = "utilities") -> np.ndarray:
    """Validate measured utilities ``[M, T]``; return them as float64.

    Raises ValueError on a shape mismatch or any non-finite value, naming the first
    offending rows: the caller decides whether to exclude those subsets.
    """
    values = np.asarray(utilities, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2 or values.shape[0] != n_subsets:
        raise ValueError(f"{what} must be [M={n_subsets}, T], got shape {np.shape(utilities)}")
    bad = ~np.isfinite(values)
    if bad.any():
        rows, cols = np.nonzero(bad)
        raise ValueError(
            f"{what} has {int(bad.sum())} non-finite values (first at rows "
            f"{sorted(set(rows[:10].tolist()))}, task columns {sorted(set(cols[:10].tolist()))}); "
            "exclude those subsets or re-measure them"
        )
    return values


def kernel_direction(
    directions: np.ndarray, moments: CorpusMoments | None, ridge: float
) -> np.ndarray:
    """TRAK's kernel-whitened task directions ``(K + λ'I)⁻¹ g`` ``[T, k']`` on the prefix.

    ``K`` is the Gram matrix of the (unweighted) features, ``moments.kernel_gram``, and
    ``λ' = ridge · tr(K)/k'``: the direction TRAK scores examples along. With it, GRASP's
    linear term is TRAK's score of the subset, so GRASP with ``b = 0`` and no correction
    *is* TRAK (same ranking): the LCB protocol can fall back to it. Rows are rescaled to their
    original norms (a scale the fitted ``a_t`` absorbs anyway).
    """
    if moments is None:
        raise ValueError("alignment 'kernel' needs the corpus moments")
    if not ridge > 0 or not math.isfinite(ridge):
        raise ValueError(f"alignment 'kernel' needs a finite ridge > 0, got {ridge}")
    from grasp_cli.surrogate.baselines import ridge_solve

    k_prime = directions.shape[1]
    gram = moments.kernel_gram[:k_prime, :k_prime]
    solved = ridge_solve(gram, directions.T, ridge * float(np.trace(gram)) / k_prime).T
    norms = np.linalg.norm(directions, axis=1, keepdims=True)
    solved_norms = np.linalg.norm(solved, axis=1, keepdims=True)
    return solved * np.where(
        solved_norms > 0, norms / np.where(solved_norms > 0, solved_norms, 1.0), 0.0
    )


def subset_aggregates(
    features: SubsetFeatures,
    k_prime: int,
    aggregation: str,
    n_ref: float | None = None,
    feature_set: str = "sketch",
) -> np.ndarray:
    """``m_S`` ``[M, k']``: mean of member features, or their sum divided by ``n_ref``."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}: choose 'mean' or 'sum'")
    all_sums = features.set_sums(feature_set)
    if k_prime > all_sums.shape[1]:
        raise ValueError(
            f"prefix k'={k_prime} exceeds the dimension {all_sums.shape[1]} of feature set {feature_set!r}"
        )
    sums = all_sums[:, :k_prime]
    if aggregation == "mean":
        features.check_nonempty()
        return sums / features.sizes[:, None]
    if n_ref is None or not n_ref > 0:
        raise ValueError("aggregation 'sum' needs a positive reference size n_ref")
    return sums / n_ref


def _solve_small(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray | None:
    """Solve a tiny unit-diagonal PSD system; None when it is (numerically) singular.

    A singular support needs no solution: its columns are collinear, and the smaller
    supports already reach every point it could.
    """
    if gram.shape[0] == 1:
        return rhs / gram[0, 0]
    if gram.shape[0] == 2:
        det = gram[0, 0] * gram[1, 1] - gram[0, 1] * gram[1, 0]
        if det <= 1e-10:
            return None
        return (
            np.array(
                [
                    gram[1, 1] * rhs[0] - gram[0, 1] * rhs[1],
                    gram[0, 0] * rhs[1] - gram[1, 0] * rhs[0],
                ]
            )
            / det
        )
    evals = np.linalg.eigvalsh(gram)
    if evals.min() <= 1e-10 * evals.max():
        return None
    return np.linalg.solve(gram, rhs)


def _nonnegative_quadratic(gram: np.ndarray, linear: np.ndarray) -> np.ndarray:
    """argmin_{p ≥ 0} pᵀ Q p − 2 lᵀ p for a PSD ``Q`` of size ≤ 3, by active-set enumeration.

    The optimum of a convex problem with nonnegativity constraints is the unconstrained
    optimum restricted to its support, which is strictly positive there; every such
    candidate is feasible, so the best candidate over all supports is the optimum.
    Smaller supports win ties (the simpler model).
    """
    dim = linear.shape[0]
    diag = np.diag(gram).copy()
    scale = np.where(diag > 0, 1.0 / np.sqrt(np.where(diag > 0, diag, 1.0)), 0.0)
    q = gram * scale[:, None] * scale[None, :]
    lin = linear * scale
    best = np.zeros(dim)
    best_value = 0.0
    for size in range(1, dim + 1):
        for support in combinations(range(dim), size):
            idx = list(support)
            if np.any(scale[idx] == 0):
                continue
            sub = _solve_small(q[np.ix_(idx, idx)], lin[idx])
            if sub is None:
                continue
            if np.any(sub <= 0):
                continue
            candidate = np.zeros(dim)
            candidate[idx] = sub
            value = float(candidate @ q @ candidate - 2.0 * lin @ candidate)
            if value < best_value - 1e-12 * max(abs(best_value), abs(value)):
                best, best_value = candidate, value
    return best * scale


class GraspSurrogate:
    """Per-task GRASP surrogate over a sketch prefix (see the module docstring).

    residuals: ``r_t`` ``[T, k]`` (only the first ``k'`` coords are used).
    k_prime: sketch prefix ``k'`` (default all ``k``).
    geometry: 'identity' | 'diagonal' | 'whitened' (the last two need ``moments``).
    ridge: relative ridge ``λ`` on the residual correction (``inf`` = no correction).
    aggregation: 'mean' | 'sum'.
    quadratic: False fixes ``b = 0`` (additive alignment).

    After ``fit``: ``intercepts_`` c ``[T]``, ``alignment_`` a ``[T]``, ``curvature_`` b
    ``[T]``, ``corrections_`` ``a_tΔ_t`` ``[T, k']``, ``metric_`` G ``[k', k']``,
    ``n_ref_``, ``ridge_abs_`` (the absolute penalty μ), ``n_fit_``.
    """

    kind = "grasp"

    def __init__(
        self,
        residuals: np.ndarray,
        *,
        k_prime: int | None = None,
        geometry: str = "identity",
        ridge: float = float("inf"),
        aggregation: str = "mean",
        quadratic: bool = True,
        moments: CorpusMoments | None = None,
        task_names: Sequence[str] | None = None,
        alignment: str = "plain",
        feature_set: str = "sketch",
        kernel_ridge: float | None = None,
        direction_cache: dict | None = None,
    ) -> None:
        """Store the hyperparameters; nothing is computed until ``fit`` (scikit-learn style).

        feature_set: which features ``m_S`` aggregates ("sketch": the loss-gradient sketches;
        "trak": TRAK's ``Q_i ψ_i``); ``targets``/``moments`` must be that set's. kernel_ridge:
        the relative ridge of the 'kernel' alignment. direction_cache: a dict shared by the
        candidates of one protocol run, so each direction is solved once, not once per fold.
        """
        self.targets = np.atleast_2d(np.asarray(residuals, dtype=np.float64))
        self.k_prime = int(self.targets.shape[1] if k_prime is None else k_prime)
        self.geometry = geometry if quadratic else "identity"
        self.ridge = float(ridge)
        self.aggregation = aggregation
        self.quadratic = bool(quadratic)
        self.moments = moments
        self.alignment = alignment
        self.feature_set = feature_set
        self.kernel_ridge = kernel_ridge
        self.direction_cache = direction_cache
        self.task_names = (
            list(task_names)
            if task_names is not None
            else [f"task{t}" for t in range(self.targets.shape[0])]
        )
        self.n_ref_: float | None = None
        self.n_fit_ = 0

    def _check_params(self) -> None:
        k = self.targets.shape[1]
        if not 0 < self.k_prime <= k:
            raise ValueError(f"sketch prefix k'={self.k_prime} must lie in 1..{k}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.aggregation!r}: choose 'mean' or 'sum'")
        if not self.ridge >= 0:
            raise ValueError(f"ridge λ must be >= 0 (or inf), got {self.ridge}")
        if self.alignment not in ALIGNMENTS:
            raise ValueError(
                f"unknown alignment {self.alignment!r}: choose one of {', '.join(ALIGNMENTS)}"
            )
        if len(self.task_names) != self.targets.shape[0]:
            raise ValueError(
                f"{len(self.task_names)} task names for {self.targets.shape[0]} residuals"
            )

    def directions(self) -> np.ndarray:
        """The task directions ``[T, k']`` the alignment term uses: the targets' prefix, or
        their natural (metric-preconditioned) version."""
        self._check_params()
        key = (self.feature_set, self.k_prime, self.alignment, self.kernel_ridge)
        if self.direction_cache is not None and key in self.direction_cache:
            return self.direction_cache[key].copy()
        prefix = self.targets[:, : self.k_prime].copy()
        if self.alignment == "natural":
            prefix = natural_direction(prefix, self.moments)
        elif self.alignment == "kernel":
            prefix = kernel_direction(prefix, self.moments, float(self.kernel_ridge or 0.0))
        if self.direction_cache is not None:
            self.direction_cache[key] = prefix.copy()
        return prefix

    # ------------------------------------------------------------------ fitting

    @property
    def n_tasks(self) -> int:
        return int(self.targets.shape[0])

    @property
    def residuals(self) -> np.ndarray:
        """The fitted task directions ``[T, k']`` (``directions()`` frozen at ``fit``)."""
        self._check_fitted()
        return self.directions_

    def aggregates(self, features: SubsetFeatures) -> np.ndarray:
        """``m_S`` ``[M, k']`` for the model's aggregation (needs a fitted ``n_ref`` for 'sum')."""
        return subset_aggregates(
            features, self.k_prime, self.aggregation, self.n_ref_, self.feature_set
        )

    def fit(self, features: SubsetFeatures, utilities: np.ndarray) -> GraspSurrogate:
        """Fit every task on the given (fit-role) subsets. ``utilities``: ``[M, T]``, higher is better."""
        values = check_utilities(utilities, len(features), "fit utilities")
        if values.shape[1] != self.n_tasks:
            raise ValueError(f"utilities have {values.shape[1]} tasks, residuals {self.n_tasks}")
        if len(features) < 2:
            raise ValueError("GRASP needs at least 2 fit subsets")
        features.check_nonempty()
        self.directions_ = self.directions()
        self.metric_ = geometry_matrix(self.geometry, self.k_prime, self.moments)
        self.n_ref_ = float(np.mean(features.sizes))
        means = self.aggregates(features)
        n = means.shape[0]
        centered = means - means.mean(axis=0)
        design_energy = float(np.sum(centered**2))
        if math.isinf(self.ridge) or design_energy <= 0:
            self.ridge_abs_ = float("inf") if math.isinf(self.ridge) else 0.0
            left = np.zeros((n, 0))
            shrink = np.zeros(0)
            sing = np.zeros(0)
            right = np.zeros((0, self.k_prime))
        else:
            self.ridge_abs_ = self.ridge * design_energy / self.k_prime
            # The thin SVD of the [n, k'] design from the eigendecomposition of its [n, n] Gram:
            # n (fit subsets) is small and k' large, and LAPACK's SVD of a wide matrix is slow
            # (and erratic under threaded BLAS); the Gram route is exact to rounding.
            evals, evecs = np.linalg.eigh(centered @ centered.T)
            keep = evals > 1e-12 * max(float(evals.max()), 1e-300)
            sing = np.sqrt(evals[keep])
            left = evecs[:, keep]
            right = (centered.T @ left / sing).T
            shrink = sing**2 / (sing**2 + self.ridge_abs_)

        def inner(u: np.ndarray, v: np.ndarray) -> np.ndarray:
            # uᵀ A v with A = P (I − M̃ (M̃ᵀM̃ + μI)⁻¹ M̃ᵀ) P: what the ridge on (c, w) leaves.
            uc, vc = u - u.mean(axis=0), v - v.mean(axis=0)
            pu, pv = left.T @ uc, left.T @ vc
            return uc.T @ vc - pu.T @ (shrink[:, None] * pv)

        alignment_x = means @ self.directions_.T  # [n, T]
        penalty_x = -0.5 * self._sq_norm(means)  # [n]
        self.intercepts_ = np.zeros(self.n_tasks)
        self.alignment_ = np.zeros(self.n_tasks)
        self.curvature_ = np.zeros(self.n_tasks)
        self.corrections_ = np.zeros((self.n_tasks, self.k_prime))
        for t in range(self.n_tasks):
            cols = [alignment_x[:, t]] + ([penalty_x] if self.quadratic else [])
            design = np.stack(cols, axis=1)
            target = values[:, t : t + 1]
            coef = _nonnegative_quadratic(inner(design, design), inner(design, target)[:, 0])
            rest = values[:, t] - design @ coef
            if sing.size:
                rest_c = rest - rest.mean()
                self.corrections_[t] = right.T @ (
                    (sing / (sing**2 + self.ridge_abs_)) * (left.T @ rest_c)
                )
            self.alignment_[t] = coef[0]
            self.curvature_[t] = coef[1] if self.quadratic else 0.0
            self.intercepts_[t] = float(np.mean(rest - means @ self.corrections_[t]))
        self.n_fit_ = n
        return self

    # ---------------------------------------------------------------- prediction

    def _check_fitted(self) -> None:
        if self.n_ref_ is None:
            raise ValueError("the surrogate is not fitted yet")

    @property
    def linear_vectors(self) -> np.ndarray:
        """``v_t = a_t (r_t + Δ_t) = a_t r_t + w_t`` ``[T, k']``."""
        self._check_fitted()
        return self.alignment_[:, None] * self.residuals + self.corrections_

    def quadratic_matrix(self, task: int) -> np.ndarray:
        """``B_t = b_t G`` ``[k', k']``, so ``Û_t = c_t + ⟨v_t, m⟩ − ½ mᵀ B_t m``."""
        self._check_fitted()
        return self.curvature_[task] * self.metric_

    def predict_aggregates(self, means: np.ndarray) -> np.ndarray:
        """``Û`` ``[M, T]`` from aggregates ``m_S`` ``[M, k']`` (no subset bookkeeping)."""
        self._check_fitted()
        means = np.atleast_2d(np.asarray(means, dtype=np.float64))
        linear = means @ self.linear_vectors.T
        penalty = 0.5 * self._sq_norm(means)[:, None] * self.curvature_[None, :]
        return self.intercepts_[None, :] + linear - penalty

    def _sq_norm(self, means: np.ndarray) -> np.ndarray:
        return sq_norm(means, self.metric_, diagonal=is_diagonal(self.geometry))

    def predict(self, features: SubsetFeatures) -> np.ndarray:
        """Predicted utilities ``[M, T]`` for the subsets described by ``features``."""
        self._check_fitted()
        return self.predict_aggregates(self.aggregates(features))

    def terms(self, features: SubsetFeatures) -> dict[str, np.ndarray]:
        """The prediction split into ``intercept + alignment − penalty`` (each ``[M, T]``)."""
        means = self.aggregates(features)
        return {
            "intercept": np.broadcast_to(self.intercepts_, (means.shape[0], self.n_tasks)).copy(),
            "alignment": means @ self.linear_vectors.T,
            "penalty": 0.5 * self._sq_norm(means)[:, None] * self.curvature_[None, :],
        }

    # ----------------------------------------------------------- serialization

    def params(self) -> dict[str, Any]:
        """JSON-able description (infinite λ written as ``"inf"``); vectors live in ``to_arrays``."""
        self._check_fitted()
        tasks = []
        for t, name in enumerate(self.task_names):
            a = float(self.alignment_[t])
            w_norm = float(np.linalg.norm(self.corrections_[t]))
            delta_norm: float | None = w_norm / a if a > 0 else (0.0 if w_norm == 0 else None)
            tasks.append(
                {
                    "task": name,
                    "a": a,
                    "b": float(self.curvature_[t]),
                    "c": float(self.intercepts_[t]),
                    "delta_norm": delta_norm,
                    "correction_norm": w_norm,
                    "residual_norm": float(np.linalg.norm(self.residuals[t])),
                }
            )
        return {
            "kind": self.kind,
            "features": self.feature_set,
            "alignment": self.alignment,
            "kernel_ridge": None if self.kernel_ridge is None else float_to_json(self.kernel_ridge),
            "quadratic": self.quadratic,
            "k": self.k_prime,
            "geometry": self.geometry,
            "ridge": float_to_json(self.ridge),
            "ridge_abs": float_to_json(self.ridge_abs_),
            "aggregation": self.aggregation,
            "n_ref": self.n_ref_,
            "n_fit": self.n_fit_,
            "tasks": tasks,
        }

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Every number needed to rebuild the model with ``from_arrays``."""
        self._check_fitted()
        return {
            "residuals": self.residuals.copy(),
            "corrections": self.corrections_.copy(),
            "metric": self.metric_.copy(),
            "intercepts": self.intercepts_.copy(),
            "alignment": self.alignment_.copy(),
            "curvature": self.curvature_.copy(),
        }

    @classmethod
    def from_arrays(cls, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> GraspSurrogate:
        """Rebuild a fitted surrogate from ``params()`` and ``to_arrays()`` (deserialization:
        the constructor takes the hyperparameters, the stored arrays are the fitted state)."""
        directions = np.asarray(arrays["residuals"], dtype=np.float64)
        model = cls(
            directions,
            k_prime=int(params["k"]),
            geometry=params["geometry"],
            ridge=float_from_json(params["ridge"]),
            aggregation=params["aggregation"],
            quadratic=bool(params["quadratic"]),
            task_names=[task["task"] for task in params["tasks"]],
            alignment="plain",  # the stored directions are already the fitted (e.g. natural) ones
            feature_set=params.get("features", "sketch"),
        )
        model._check_params()
        model.directions_ = directions
        model.metric_ = np.asarray(arrays["metric"], dtype=np.float64)
        model.corrections_ = np.asarray(arrays["corrections"], dtype=np.float64)
        model.intercepts_ = np.asarray(arrays["intercepts"], dtype=np.float64)
        model.alignment_ = np.asarray(arrays["alignment"], dtype=np.float64)
        model.curvature_ = np.asarray(arrays["curvature"], dtype=np.float64)
        model.ridge_abs_ = float_from_json(params["ridge_abs"])
        model.n_ref_ = float(params["n_ref"])
        model.n_fit_ = int(params["n_fit"])
        return model

    def unfitted_copy(self) -> GraspSurrogate:
        """A new, unfitted surrogate with the same hyperparameters (the one factory for refits)."""
        return GraspSurrogate(
            self.targets,
            k_prime=self.k_prime,
            geometry=self.geometry,
            ridge=self.ridge,
            aggregation=self.aggregation,
            quadratic=self.quadratic,
            moments=self.moments,
            task_names=self.task_names,
            alignment=self.alignment,
            feature_set=self.feature_set,
            kernel_ridge=self.kernel_ridge,
            direction_cache=self.direction_cache,
        )
