"""The selection objective: the fitted surrogate as a function of a subset's summed sketch.

Every subset S of the budget size B enters the surrogate through ``s = Σ_{i∈S} φ_i``
(``k'`` numbers): ``m_S = scale · s`` with ``scale = 1/B`` for the mean aggregation
(normalized by the *final* B, so marginal gains along a selection are comparable) or a
fixed constant for the sum aggregation.

The objective is a set of *scenarios* ``j = 1..J``, each a concave quadratic in ``s``::

    f_j(s) = c_j + scale·⟨u_j, s⟩ − ½ scale² · sᵀ Q_j s          (Q_j PSD)

and ``F(s) = mean_j f_j − κ · std_j f_j`` (means and stds weighted by ``weights``).
With one scenario (or κ = 0) F is a plain quadratic; this is the usual case,
``F(S) = Σ_t w_t Û_t(S) / σ_t`` folded into one ``(u, Q, c)``. Robust modes keep one
scenario per task (``'tasks'``: a lower confidence bound across tasks) or one per
bootstrap refit of the surrogate (``'bootstrap'``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from grasp_cli.errors import InputError

ROBUST_MODES = ("none", "tasks", "bootstrap")


@dataclass(frozen=True)
class SelectionObjective:
    """Scenarios ``(u_j, Q_j, c_j)`` of a concave quadratic surrogate and the robust rule.

    Attributes:
        linear: ``[J, k]`` linear terms ``u_j`` (per unit of ``m_S``).
        quadratic: ``[J, k, k]`` PSD matrices ``Q_j``.
        offset: ``[J]`` constants ``c_j``.
        scale: ``m_S = scale · Σ_{i∈S} φ_i`` (``1/B`` for the mean aggregation).
        kappa: robust penalty: ``F = mean − κ·std`` across scenarios (0 = the mean).
        mode: ``'none'``, ``'tasks'`` or ``'bootstrap'`` (a label; the math is the same).
        weights: ``[J]`` scenario weights, non-negative, summing to 1.
    """

    linear: np.ndarray
    quadratic: np.ndarray
    offset: np.ndarray
    scale: float
    kappa: float = 0.0
    mode: str = "none"
    weights: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        linear = np.atleast_2d(np.asarray(self.linear, dtype=np.float64))
        n_scen, k = linear.shape
        quadratic = np.asarray(self.quadratic, dtype=np.float64)
        if quadratic.ndim == 2:
            quadratic = quadratic[None]
        if quadratic.shape != (n_scen, k, k):
            raise InputError(
                f"selection objective: quadratic has shape {quadratic.shape}, expected {(n_scen, k, k)}"
            )
        offset = np.broadcast_to(np.asarray(self.offset, dtype=np.float64), (n_scen,)).copy()
        if self.weights is None:
            weights = np.full(n_scen, 1.0 / n_scen)
        else:
            weights = np.asarray(self.weights, dtype=np.float64).reshape(-1)
            if weights.shape != (n_scen,) or np.any(weights < 0) or weights.sum() <= 0:
                raise InputError(
                    f"selection objective: weights must be {n_scen} non-negative numbers with a positive sum"
                )
            weights = weights / weights.sum()
        if not np.isfinite(self.scale) or self.scale <= 0:
            raise InputError(
                f"selection objective: scale must be a positive number, got {self.scale}"
            )
        if self.kappa < 0 or not np.isfinite(self.kappa):
            raise InputError(f"selection objective: kappa must be >= 0, got {self.kappa}")
        if self.mode not in ROBUST_MODES:
            raise InputError(
                f"selection objective: mode {self.mode!r}: choose one of {ROBUST_MODES}"
            )
        # symmetrize: only the symmetric part of Q matters, and the gradient formula assumes it
        quadratic = 0.5 * (quadratic + quadratic.transpose(0, 2, 1))
        object.__setattr__(self, "linear", linear)
        object.__setattr__(self, "quadratic", quadratic)
        object.__setattr__(self, "offset", offset)
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "kappa", float(self.kappa))

    # ------------------------------------------------------------ shape

    @property
    def dim(self) -> int:
        """k': the sketch prefix the objective uses (rows of φ are cut to this)."""
        return int(self.linear.shape[1])

    @property
    def n_scenarios(self) -> int:
        return int(self.linear.shape[0])

    @property
    def is_quadratic(self) -> bool:
        """True when F is one concave quadratic (one scenario, or κ = 0)."""
        return self.n_scenarios == 1 or self.kappa == 0.0

    def collapsed(self) -> SelectionObjective:
        """The weighted-mean scenario as a one-scenario objective; equal to F when ``is_quadratic``."""
        return SelectionObjective(
            linear=self.weights @ self.linear,
            quadratic=np.tensordot(self.weights, self.quadratic, axes=1),
            offset=np.array([self.weights @ self.offset]),
            scale=self.scale,
            kappa=0.0,
            mode=self.mode,
        )

    def mean_linear(self) -> np.ndarray:
        """``[k]`` weighted mean of the linear terms: the additive (alignment-only) score direction."""
        return self.weights @ self.linear

    # ------------------------------------------------------------ values

    def scenario_values(self, s: np.ndarray) -> np.ndarray:
        """``f_j(s)`` for ``s`` of shape ``[k]`` (returns ``[J]``) or ``[M, k]`` (returns ``[M, J]``)."""
        s = np.asarray(s, dtype=np.float64)
        lin = s @ self.linear.T  # [.., J]
        qs = np.einsum("jab,...b->...ja", self.quadratic, s)  # [.., J, k]
        quad = np.einsum("...ja,...a->...j", qs, s)
        return self.offset + self.scale * lin - 0.5 * self.scale**2 * quad

    def combine(self, scenario_values: np.ndarray) -> np.ndarray | float:
        """``mean − κ·std`` over the last axis of per-scenario values ``[..., J]``."""
        vals = np.asarray(scenario_values, dtype=np.float64)
        mean = vals @ self.weights
        if self.kappa == 0.0 or self.n_scenarios == 1:
            return mean
        centered = vals - mean[..., None]
        std = np.sqrt(np.maximum((centered**2) @ self.weights, 0.0))
        return mean - self.kappa * std

    def value(self, s: np.ndarray) -> np.ndarray | float:
        """F at ``s = Σ_{i∈S} φ_i``: a float for ``s`` of shape ``[k]``, ``[M]`` for ``[M, k]``."""
        out = self.combine(self.scenario_values(s))
        return float(out) if np.ndim(out) == 0 else out

    def scenario_gradients(self, s: np.ndarray) -> np.ndarray:
        """``[J, k]``: ``∇_s f_j = scale·u_j − scale²·Q_j s``."""
        s = np.asarray(s, dtype=np.float64)
        return self.scale * self.linear - self.scale**2 * (self.quadratic @ s)

    def gradient(self, s: np.ndarray) -> np.ndarray:
        """``[k]``: ∇_s F at ``s`` (the std term's gradient is taken as 0 where the std is 0)."""
        grads = self.scenario_gradients(s)
        mean_grad = self.weights @ grads
        if self.kappa == 0.0 or self.n_scenarios == 1:
            return mean_grad
        vals = self.scenario_values(s)
        centered = vals - vals @ self.weights
        std = float(np.sqrt(max((centered**2) @ self.weights, 0.0)))
        if std <= 1e-300:
            return mean_grad
        std_grad = ((self.weights * centered) @ grads) / std
        return mean_grad - self.kappa * std_grad

    def line_search(self, s: np.ndarray, direction: np.ndarray) -> float:
        """The step γ ∈ [0, 1] maximizing ``F(s + γ·direction)``.

        Exact for a quadratic F; for the robust form, each scenario is a quadratic in γ, so
        F is evaluated on a fine grid and refined around the best grid point.
        """
        s = np.asarray(s, dtype=np.float64)
        d = np.asarray(direction, dtype=np.float64)
        grads = self.scenario_gradients(s)  # [J, k]
        slope = grads @ d  # [J]
        curv = self.scale**2 * np.einsum("a,jab,b->j", d, self.quadratic, d)  # [J] >= 0
        base = self.scenario_values(s)
        if self.is_quadratic:
            a = float(self.weights @ slope)
            b = float(self.weights @ curv)
            if b <= 0:
                return 1.0 if a > 0 else 0.0
            return float(np.clip(a / b, 0.0, 1.0))

        def along(gammas: np.ndarray) -> np.ndarray:
            vals = base + gammas[:, None] * slope - 0.5 * gammas[:, None] ** 2 * curv
            return np.asarray(self.combine(vals))

        # small steps matter: the std term can curve F sharply near γ = 0
        grid = np.unique(
            np.concatenate([[0.0], np.geomspace(1e-6, 1.0, 121), np.linspace(0.0, 1.0, 257)])
        )
        best = int(np.argmax(along(grid)))
        lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
        fine = np.linspace(lo, hi, 129)
        return float(fine[int(np.argmax(along(fine)))])


# ---------------------------------------------------------------- builders


def aggregation_scale(aggregation: str, budget: int, sum_scale: float = 1.0) -> float:
    """``scale`` in ``m_S = scale · Σ φ_i``: ``1/budget`` for ``'mean'``, ``sum_scale`` for ``'sum'``."""
    if aggregation == "mean":
        if budget < 1:
            raise InputError(f"budget must be at least 1, got {budget}")
        return 1.0 / budget
    if aggregation == "sum":
        return float(sum_scale)
    raise InputError(f"aggregation {aggregation!r}: choose 'mean' or 'sum'")


def _task_arrays(
    linear: np.ndarray,
    quadratic: np.ndarray | Sequence[np.ndarray],
    offset: np.ndarray | Sequence[float] | None,
    weights: np.ndarray | Sequence[float] | None,
    sigma: np.ndarray | Sequence[float] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate per-task arrays; Q_t may be full ``[k, k]``, diagonal ``[k]`` or a scalar."""
    v = np.atleast_2d(np.asarray(linear, dtype=np.float64))
    n_tasks, k = v.shape
    q_list = (
        list(quadratic)
        if not isinstance(quadratic, np.ndarray) or quadratic.ndim != 3
        else quadratic
    )
    if len(q_list) != n_tasks:
        raise InputError(f"surrogate: {len(q_list)} quadratic terms for {n_tasks} tasks")
    q = np.empty((n_tasks, k, k))
    for t, q_t in enumerate(q_list):
        q_t = np.asarray(q_t, dtype=np.float64)
        if q_t.ndim == 0:
            q[t] = q_t * np.eye(k)
        elif q_t.shape == (k,):
            q[t] = np.diag(q_t)
        elif q_t.shape == (k, k):
            q[t] = q_t
        else:
            raise InputError(
                f"surrogate: task {t} quadratic has shape {q_t.shape}; expected (), ({k},) or ({k}, {k})"
            )
    c = np.zeros(n_tasks) if offset is None else np.asarray(offset, dtype=np.float64).reshape(-1)
    w = np.ones(n_tasks) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    sig = np.ones(n_tasks) if sigma is None else np.asarray(sigma, dtype=np.float64).reshape(-1)
    for name, arr in (("offset", c), ("weights", w), ("sigma", sig)):
        if arr.shape != (n_tasks,):
            raise InputError(f"surrogate: {name} has {arr.size} entries for {n_tasks} tasks")
    if np.any(w < 0):
        raise InputError("select.task_weights must be non-negative")
    if np.any(sig <= 0) or not np.all(np.isfinite(sig)):
        raise InputError("per-task utility scales (sigma) must be positive and finite")
    return v, q, c, w, sig


def objective_from_tasks(
    linear: np.ndarray,
    quadratic: np.ndarray | Sequence[np.ndarray],
    offset: np.ndarray | Sequence[float] | None,
    scale: float,
    weights: np.ndarray | Sequence[float] | None = None,
    sigma: np.ndarray | Sequence[float] | None = None,
    robust: str = "none",
    kappa: float = 1.0,
) -> SelectionObjective:
    """Build F from per-task surrogate terms (already cut to the sketch prefix k').

    Args:
        linear: ``[T, k]`` ``v_t`` (``a_t (r_t + Δ_t)``).
        quadratic: ``[T, k, k]`` ``Q_t = b_t G_t`` (or per task ``[k]`` diagonal / scalar).
        offset: ``[T]`` ``c_t`` (None = 0).
        scale: see :func:`aggregation_scale`.
        weights: ``[T]`` task weights ``w_t`` (None = 1).
        sigma: ``[T]`` per-task utility scales ``σ_t`` (None = 1).
        robust: ``'none'`` → one scenario ``Σ_t w_t Û_t/σ_t``;
            ``'tasks'`` → one scenario per task ``Û_t/σ_t`` weighted by ``w_t / Σw``
            and ``F = mean − κ·std`` across tasks.
        kappa: the robust penalty (ignored for ``'none'``).
    """
    v, q, c, w, sig = _task_arrays(linear, quadratic, offset, weights, sigma)
    coef = w / sig
    if robust == "none":
        return SelectionObjective(
            linear=(coef @ v)[None],
            quadratic=np.tensordot(coef, q, axes=1)[None],
            offset=np.array([coef @ c]),
            scale=scale,
        )
    if robust == "tasks":
        if w.sum() <= 0:
            raise InputError("select.task_weights: at least one task needs a positive weight")
        return SelectionObjective(
            linear=v / sig[:, None],
            quadratic=q / sig[:, None, None],
            offset=c / sig,
            scale=scale,
            kappa=kappa,
            mode="tasks",
            weights=w,
        )
    if robust == "bootstrap":
        raise InputError("robust='bootstrap' needs the refits: use objective_from_bootstrap")
    raise InputError(f"select.robust = {robust!r}: choose one of {ROBUST_MODES}")


def objective_from_bootstrap(
    refits: Sequence[tuple[np.ndarray, Any, Any]],
    scale: float,
    weights: np.ndarray | Sequence[float] | None = None,
    sigma: np.ndarray | Sequence[float] | None = None,
    kappa: float = 1.0,
) -> SelectionObjective:
    """Build the robust F across bootstrap refits of the surrogate.

    Args:
        refits: per refit ``(v [T, k], Q [T, k, k] | per-task diag/scalar, c [T] | None)``.
        scale, weights, sigma: as in :func:`objective_from_tasks` (shared by all refits).
        kappa: ``F = mean − κ·std`` across refits of ``Σ_t w_t Û_t/σ_t``.
    """
    if len(refits) == 0:
        raise InputError("robust='bootstrap' needs at least one surrogate refit")
    scenarios = [
        objective_from_tasks(v, q, c, scale=scale, weights=weights, sigma=sigma)
        for v, q, c in refits
    ]
    dims = {sc.dim for sc in scenarios}
    if len(dims) != 1:
        raise InputError(
            f"bootstrap refits use different sketch dims {sorted(dims)}; refit with one k'"
        )
    return SelectionObjective(
        linear=np.concatenate([sc.linear for sc in scenarios]),
        quadratic=np.concatenate([sc.quadratic for sc in scenarios]),
        offset=np.concatenate([sc.offset for sc in scenarios]),
        scale=scale,
        kappa=kappa,
        mode="bootstrap",
    )


# ---------------------------------------------------------------- budget and caps


def budget_count(budget: int | float, n: int) -> int:
    """``select.budget`` as a count: an integer (or a whole float above 1) is the count itself;
    a float in (0, 1] is a fraction of ``n``, ``max(1, round(budget · n))``. See
    ``config.check_budget`` for what is refused (NaN, infinities, ``1.5``, non-positive)."""
    from grasp_cli.config import check_budget

    check_budget(budget)
    if isinstance(budget, float) and budget <= 1.0:
        count = max(1, int(round(budget * n)))
    else:
        count = int(budget)
    if count > n:
        raise InputError(
            f"select.budget = {budget} asks for {count} examples but the corpus has {n}"
        )
    return count


def domain_caps(
    spec: Mapping[str, float],
    domain_names: Sequence[str],
    budget: int,
) -> np.ndarray:
    """Integer caps ``[D]`` per domain code from ``select.domain_caps``.

    A value <= 1 is a share of the budget (cap = floor(share · B)); a value > 1 a count.
    Domains not named are uncapped (cap = B).
    """
    names = list(domain_names)
    unknown = sorted(set(spec) - set(names))
    if unknown:
        raise InputError(f"select.domain_caps names unknown domains {unknown} (corpus has {names})")
    caps = np.full(len(names), budget, dtype=np.int64)
    for d, name in enumerate(names):
        if name in spec:
            value = float(spec[name])
            if value < 0:
                raise InputError(f"select.domain_caps.{name} must be >= 0, got {value}")
            caps[d] = int(np.floor(value * budget + 1e-9)) if value <= 1 else int(value)
    return np.minimum(caps, budget)


def check_constraints(
    n: int,
    budget: int,
    domains: np.ndarray | None,
    caps: np.ndarray | Sequence[int] | None,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Validate ``budget`` and per-domain ``caps`` against ``n`` examples; returns (domains, caps).

    ``domains``: ``[n]`` integer codes in ``[0, D)``; ``caps``: ``[D]`` max count per code.
    Raises InputError when the caps cannot be met (Σ_d min(cap_d, |domain d|) < budget).
    """
    if not 1 <= budget <= n:
        raise InputError(f"budget {budget} must lie in [1, {n}] (the corpus has {n} examples)")
    if caps is None:
        return None, None
    if domains is None:
        raise InputError("per-domain caps need the domain code of every example")
    domains = np.asarray(domains)
    if domains.shape != (n,) or not np.issubdtype(domains.dtype, np.integer):
        raise InputError(
            f"domain codes must be {n} integers, got shape {domains.shape} {domains.dtype}"
        )
    caps = np.asarray(caps, dtype=np.int64).reshape(-1)
    if n and (domains.min() < 0 or domains.max() >= len(caps)):
        raise InputError(f"domain codes must lie in [0, {len(caps)}) (one cap per domain)")
    if np.any(caps < 0):
        raise InputError("domain caps must be >= 0")
    sizes = np.bincount(domains, minlength=len(caps))
    reachable = int(np.minimum(caps, sizes).sum())
    if reachable < budget:
        raise InputError(
            f"domain caps allow at most {reachable} examples but the budget is {budget}; "
            "raise select.domain_caps or lower select.budget"
        )
    return domains, caps


# ---------------------------------------------------------------- result


@dataclass
class Selection:
    """A selected subset.

    Attributes:
        indices: ``[B]`` int64 row indices, in selection order (greedy) or by decreasing
            gain (stream, additive).
        gains: ``[B]`` float64, same order: greedy — the exact marginal gain of F when the
            example was taken (they sum to F(S) − F(∅)); stream — its linearized gain
            ``⟨∇_s F(s), φ_i⟩`` at the linearization that produced the set; additive — its
            standalone linear score ``scale·⟨ū, φ_i⟩``.
        value: F of the selected set.
        s: ``[k']`` the selected set's summed sketch ``Σ_{i∈S} φ_i``.
        algorithm: ``'greedy'``, ``'stream'`` or ``'additive'``.
        passes: full reads of the sketch array (stream, additive); 0 for greedy (in memory).
        history: stream — one dict per pass: ``vertex`` (F of the pass's top-B set), ``gap``
            (conditional-gradient gap at the pass), ``new`` (top-B examples not yet in
            memory), ``relaxed`` (F of the relaxed point after the in-memory steps),
            ``rounded`` (F of its rounding), ``inner`` (in-memory steps), and on the last
            pass ``completed`` (F of the greedy completion) when it ran; greedy — one dict
            with ``refreshes`` (full gain updates) and ``lazy_steps``.
        converged: stream: True when it stopped before ``max_iters``.
    """

    indices: np.ndarray
    gains: np.ndarray
    value: float
    s: np.ndarray
    algorithm: str
    passes: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    converged: bool = True
