"""Exact greedy selection for corpora whose sketches fit in memory.

At each of B steps the example with the largest exact marginal gain
``F(S ∪ {i}) − F(S)`` is taken (``scale`` fixed by the final B, so gains along the way
are comparable). For scenario j the gain of i is closed-form::

    δ_ij = scale·⟨u_j, φ_i⟩ − scale²·(φ_iᵀ Q_j s + ½ φ_iᵀ Q_j φ_i)

so only ``h_ij = φ_iᵀ Q_j s`` changes as S grows. Updating h for all N after every step
costs one ``[N, k] @ [k, J]`` product. *Lazy evaluation* defers that product: gains are
kept "stale" at an older ``s₀``; with ``p = s − s₀`` the error of a stale gain is bounded by
Cauchy–Schwarz in the Q_j geometry, ``|φ_iᵀ Q_j p| ≤ ‖φ_i‖_{Q_j} ‖p‖_{Q_j}``. That gives a
valid upper bound on every gain (for the robust mean − κ·std too, since std is a
seminorm) without assuming submodularity — F is not submodular when two sketches are
anti-aligned. A step evaluates exact gains only for the few examples with the highest
bounds; when the best exact gain beats every other bound it is the exact argmax,
otherwise all gains are refreshed (one product) and the argmax is taken directly.
"""

from __future__ import annotations

import numpy as np

from grasp_cli.select.objective import Selection, SelectionObjective, check_constraints


def greedy_select(
    phi: np.ndarray,
    objective: SelectionObjective,
    budget: int,
    domains: np.ndarray | None = None,
    caps: np.ndarray | None = None,
    lazy: bool = True,
    candidates: int = 32,
) -> Selection:
    """Exact (lazy) greedy maximization of F subject to ``|S| = budget`` and per-domain caps.

    Args:
        phi: ``[N, k]`` sketches in memory (columns beyond ``objective.dim`` are ignored).
        objective: the surrogate objective (its ``scale`` should already reflect ``budget``).
        budget: B, the number of examples to select.
        domains: ``[N]`` integer domain codes (needed with ``caps``).
        caps: ``[D]`` max number of selected examples per domain code.
        lazy: use bounded-staleness lazy evaluation (same result, fewer ``[N, k]`` products).
        candidates: exact gains evaluated per lazy step.

    Returns:
        A :class:`Selection` with indices in selection order and each one's exact marginal
        gain when taken; ``history`` holds one dict with the refresh counts.
    """
    phi = np.asarray(phi)
    if phi.ndim != 2 or phi.shape[1] < objective.dim:
        raise ValueError(f"phi must be [N, >= {objective.dim}], got {phi.shape}")
    n = phi.shape[0]
    domains, caps = check_constraints(n, budget, domains, caps)
    feats = np.ascontiguousarray(phi[:, : objective.dim], dtype=np.float64)
    selected, gains, s, stats = greedy_extend(
        feats,
        objective,
        budget,
        np.zeros(objective.dim),
        domains,
        caps,
        lazy=lazy,
        candidates=candidates,
    )
    return Selection(
        indices=selected,
        gains=gains,
        value=float(objective.value(s)),
        s=s,
        algorithm="greedy",
        passes=0,
        history=[stats],
    )


def greedy_extend(
    feats: np.ndarray,
    objective: SelectionObjective,
    count: int,
    base: np.ndarray,
    domains: np.ndarray | None = None,
    caps: np.ndarray | None = None,
    lazy: bool = True,
    candidates: int = 32,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    """Greedily add ``count`` rows of ``feats`` to a set whose summed sketch is ``base``.

    ``feats`` ``[M, k]`` float64 are the candidates; ``caps`` ``[D]`` are the slots left per
    domain code (``domains`` ``[M]``). Returns ``(positions [count], gains [count],
    s [k] = base + Σ chosen rows, stats)``. The caller makes sure ``count`` is reachable.
    """
    n, k = feats.shape
    obj = objective.collapsed() if objective.is_quadratic else objective
    scale = obj.scale
    sc2 = scale * scale
    lin = obj.linear.T  # [k, J]
    quad = obj.quadratic  # [J, k, k]
    n_scen = obj.n_scenarios
    single = n_scen == 1
    base = np.asarray(base, dtype=np.float64)

    # per example and scenario: ‖φ_i‖²_{Q_j}, its root, and the gain at s = base
    self_quad = np.empty((n, n_scen))
    for j in range(n_scen):
        self_quad[:, j] = np.einsum("ia,ia->i", feats @ quad[j], feats)
    np.maximum(self_quad, 0.0, out=self_quad)
    qnorm = np.sqrt(self_quad)
    stale = scale * (feats @ lin) - 0.5 * sc2 * self_quad  # [N, J]
    del self_quad
    if base.any():
        stale -= sc2 * (feats @ (quad @ base).T)

    s = base.copy()
    pending = np.zeros(k)  # s − s0, where s0 is the point the stale gains were computed at
    f_now = obj.scenario_values(s)  # [J]
    value_now = float(obj.combine(f_now))
    available = np.ones(n, dtype=bool)
    slots = None
    if caps is not None:
        slots = np.asarray(caps, dtype=np.int64).copy()
        available &= slots[domains] > 0

    selected = np.empty(count, dtype=np.int64)
    gains = np.empty(count)
    refreshes = lazy_hits = 0

    def exact_gain(scen_gain: np.ndarray) -> np.ndarray:
        """``[M, J]`` per-scenario gains → ``[M]`` gains of F."""
        if single:
            return scen_gain[:, 0]
        return np.asarray(obj.combine(f_now[None, :] + scen_gain)) - value_now

    for step in range(count):
        q_pending = (quad @ pending).T  # [k, J]
        pnorm = np.sqrt(np.maximum(pending @ q_pending, 0.0))  # [J]
        fresh = not pending.any()
        pick = -1
        if lazy and not fresh:
            slack = sc2 * qnorm * pnorm  # [N, J] bound on |stale − exact|
            if single:
                bound = stale[:, 0] + slack[:, 0]
            else:
                bound = (
                    exact_gain(stale)
                    + slack @ obj.weights
                    + obj.kappa * np.sqrt((slack**2) @ obj.weights)
                )
            bound = np.where(available, bound, -np.inf)
            m = min(candidates, int(available.sum()) - 1)
            if m >= 1:
                top = np.argpartition(-bound, m)[: m + 1]
                top = top[np.argsort(-bound[top], kind="stable")]
                cand, threshold = top[:m], bound[top[m]]
                cand_gain = exact_gain(stale[cand] - sc2 * (feats[cand] @ q_pending))
                best = cand_gain.max()
                if best < threshold:
                    # widen: every example whose bound beats the best exact gain so far
                    wide = np.flatnonzero(bound > best)
                    if len(wide) <= n // 8:
                        cand = wide
                        cand_gain = exact_gain(stale[cand] - sc2 * (feats[cand] @ q_pending))
                        best = cand_gain.max()
                        threshold = best
                if best >= threshold:
                    pick = int(cand[cand_gain == best].min())
                    scen_gain = stale[pick] - sc2 * (feats[pick] @ q_pending)
                    lazy_hits += 1
        if pick < 0:
            if not fresh:
                stale -= sc2 * (feats @ q_pending)
                pending[:] = 0.0
                refreshes += 1
            all_gain = np.where(available, exact_gain(stale), -np.inf)
            pick = int(np.argmax(all_gain))
            scen_gain = stale[pick].copy()
        selected[step] = pick
        f_now = f_now + scen_gain
        new_value = float(obj.combine(f_now))
        gains[step] = new_value - value_now
        value_now = new_value
        s += feats[pick]
        pending += feats[pick]
        available[pick] = False
        if slots is not None:
            d = domains[pick]
            slots[d] -= 1
            if slots[d] <= 0:
                available[domains == d] = False

    stats = {"refreshes": float(refreshes), "lazy_steps": float(lazy_hits)}
    return selected, gains, s, stats
