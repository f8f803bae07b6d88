"""Streaming selection for corpora whose sketches live on disk (Zarr) or are too many for greedy.

Iterated linearization = conditional gradient (Frank–Wolfe) on the relaxation
``x ∈ [0, 1]^N, Σ x = B`` (plus per-domain caps), with ``s = Σ_i x_i φ_i``. Each outer
iteration is ONE pass over the sketch array, block by block:

1. score every example by its linearized gain ``g_i = ⟨∇_s F(s), φ_i⟩``;
2. keep a streaming top-B within caps (per block: a threshold filter and
   ``np.partition``, merged with the running top-B; ties go to the lower row index), plus
   the rows of the running set, so the vertex's summed sketch ``s_V`` and its exact F are
   known at the end of the same pass; optionally also the top ``B + extra_rows`` rows;
3. the conditional-gradient gap ``⟨∇F(s), s_V − s⟩`` bounds how far the relaxation is
   from its optimum; stop when it is small or when the top-B set brings no example that
   is not already in memory ("the top-B set stops changing");
4. otherwise add the new rows to the rows held in memory and run conditional-gradient
   steps (exact line search) on the relaxation restricted to them — cheap, no reads. This
   is column generation: passes only *price* the corpus, so few passes are needed.

Every pass's top-B set and every rounding of the relaxed point (the B largest ``x``; at the
end also a greedy completion: keep ``x = 1``, fill the rest by exact greedy over the other
rows in memory) is a valid integer set of size B within the caps, and F of each is
computed exactly; the best one is returned. Memory: the rows in memory, about
``(2B + extra_rows·passes)·k`` floats.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from grasp_cli.artifacts.sketches import iter_blocks
from grasp_cli.select.greedy import greedy_extend
from grasp_cli.select.objective import Selection, SelectionObjective, check_constraints

_COPY_ROWS = 8192  # rows per copy: keeps temporaries small enough for the allocator to reuse


def _sum_rows(rows: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    """``[k]`` float64 sum of ``rows[positions]`` (all rows when None), a few rows at a time."""
    total = np.zeros(rows.shape[1])
    count = len(rows) if positions is None else len(positions)
    for start in range(0, count, _COPY_ROWS):
        if positions is None:
            part = rows[start : start + _COPY_ROWS]
        else:
            part = rows[positions[start : start + _COPY_ROWS]]
        total += part.sum(axis=0, dtype=np.float64)
    return total


class StreamingTopB:
    """The top-``budget`` rows by score over a stream of blocks, optionally with per-domain caps.

    Blocks must arrive in increasing row order (as :func:`iter_blocks` yields them). Ties
    break towards the lower row index, so the result does not depend on block sizes. With
    ``keep_rows`` the rows of the running set live in a fixed ``[budget, k]`` buffer (a row
    that leaves the set frees its slot for one that enters), so memory stays O(budget·k).
    """

    def __init__(
        self,
        budget: int,
        caps: np.ndarray | None = None,
        keep_rows: bool = True,
        floor: float = -np.inf,
    ) -> None:
        """``floor``: a score no member of the final set is below (known from rows seen
        before, see ``_score_floor``); rows under it are dropped on arrival, unchanged result."""
        if budget < 1:
            raise ValueError(f"budget must be positive, got {budget}")
        self.budget = budget
        self.caps = caps
        self.keep_rows = keep_rows
        self.floor = float(floor)
        # the running set, in increasing row index
        self.idx = np.empty(0, dtype=np.int64)
        self.score = np.empty(0, dtype=np.float64)
        self.dom = np.empty(0, dtype=np.int64)
        self.slot = np.empty(0, dtype=np.int64)  # buffer row of each member
        self._buffer: np.ndarray | None = None
        self._order: np.ndarray | None = None

    def push(
        self,
        idx: np.ndarray,
        score: np.ndarray,
        rows: np.ndarray | None = None,
        dom: np.ndarray | None = None,
    ) -> None:
        """Offer rows ``idx`` [m] (increasing, after every row pushed before) with ``score`` [m],
        their ``rows`` [m, k] (with ``keep_rows``) and domain codes ``dom`` [m] (with caps)."""
        budget = self.budget
        self._order = None
        idx = np.asarray(idx, dtype=np.int64)
        score = np.asarray(score, dtype=np.float64)
        cand = np.arange(len(idx))
        least = self.score.min() if len(self.idx) >= budget else -np.inf
        if max(least, self.floor) > -np.inf:  # nothing below the B-th score can enter
            cand = cand[score >= max(least, self.floor)]
        if len(cand) == 0:
            return
        n_old = len(self.idx)
        all_score = np.concatenate([self.score, score[cand]])
        all_dom = None
        if self.caps is not None:
            all_dom = np.concatenate([self.dom, np.asarray(dom, dtype=np.int64)[cand]])
            keep = np.zeros(len(all_score), dtype=bool)
            order = np.argsort(-all_score, kind="stable")  # positions are in row order already
            order = order[_within_caps(all_dom[order], self.caps)]
            keep[order[:budget]] = True
        elif len(all_score) > budget:
            cut = np.partition(all_score, len(all_score) - budget)[len(all_score) - budget]
            keep = all_score > cut
            ties = np.flatnonzero(all_score == cut)[: budget - int(keep.sum())]
            keep[ties] = True  # the lowest row indices among the ties
        else:
            keep = np.ones(len(all_score), dtype=bool)
        entered = cand[keep[n_old:]]
        if self.keep_rows and len(entered):
            if self._buffer is None:
                self._buffer = np.empty((budget, rows.shape[1]), dtype=rows.dtype)
            used = np.zeros(budget, dtype=bool)
            used[self.slot[keep[:n_old]]] = True
            new_slots = np.flatnonzero(~used)[: len(entered)]
            for start in range(0, len(entered), _COPY_ROWS):
                part = slice(start, start + _COPY_ROWS)
                self._buffer[new_slots[part]] = rows[entered[part]]
            self.slot = np.concatenate([self.slot[keep[:n_old]], new_slots])
        self.idx = np.concatenate([self.idx, idx[cand]])[keep]
        self.score = all_score[keep]
        if all_dom is not None:
            self.dom = all_dom[keep]

    def _score_order(self) -> np.ndarray:
        if self._order is None or len(self._order) != len(self.score):
            self._order = np.argsort(-self.score, kind="stable")
        return self._order

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(indices [<=B], scores)`` by decreasing score (ties: lower index first)."""
        order = self._score_order()
        return self.idx[order], self.score[order]

    def rows(self) -> np.ndarray:
        """``[<=B, k]`` the rows of the current top set, in the order of :meth:`result`."""
        if not self.keep_rows:
            raise RuntimeError("StreamingTopB(keep_rows=False) keeps no rows")
        if self._buffer is None:
            return np.empty((0, 0), dtype=np.float32)
        slots = self.slot[self._score_order()]
        if len(slots) == self.budget and np.array_equal(slots, np.arange(self.budget)):
            return self._buffer
        return self._buffer[slots]


def _within_caps(dom_sorted: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Mask over a score-sorted sequence: True where the item ranks below its domain's cap."""
    m = len(dom_sorted)
    by_dom = np.argsort(dom_sorted, kind="stable")
    sorted_dom = dom_sorted[by_dom]
    starts = np.flatnonzero(np.r_[True, sorted_dom[1:] != sorted_dom[:-1]])
    group_start = np.repeat(starts, np.diff(np.r_[starts, m]))
    rank = np.empty(m, dtype=np.int64)
    rank[by_dom] = np.arange(m) - group_start
    return rank < caps[dom_sorted]


def _top_b_pass(
    phi: Any,
    direction: np.ndarray,
    budget: int,
    domains: np.ndarray | None,
    caps: np.ndarray | None,
    block_rows: int,
    prefetch: bool,
    progress: bool,
    desc: str,
    pool: int = 0,
    floors: tuple[float, float] = (-np.inf, -np.inf),
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One pass over ``phi`` scoring every row by ``φ_i · direction``.

    Returns the top-B within caps ``(indices, scores, rows [B, k])`` and, when ``pool`` >
    ``budget``, also the top-``pool`` rows ignoring caps ``(pool indices, pool rows)`` (extra
    candidate rows for the in-memory solve); otherwise those repeat the top-B. ``floors``:
    scores the top-B and the pool cannot fall below (``_score_floor``), or -inf.
    """
    k = len(direction)
    top = StreamingTopB(budget, caps=caps, keep_rows=True, floor=floors[0])
    wide = StreamingTopB(pool, keep_rows=True, floor=floors[1]) if pool > budget else None
    dir32 = direction.astype(np.float32)
    for start, block in iter_blocks(
        phi, block_rows, k, prefetch=prefetch, progress=progress, desc=desc
    ):
        scores = block @ dir32
        idx = np.arange(start, start + len(block), dtype=np.int64)
        if wide is not None:
            wide.push(idx, scores, rows=block)
        if wide is None or caps is not None:
            dom = None if domains is None else domains[start : start + len(block)]
            top.push(idx, scores, rows=block, dom=dom)
    if wide is None:
        indices, scores = top.result()
        rows = top.rows()
        return indices, scores, rows, indices, rows
    pool_idx, pool_scores = wide.result()
    pool_rows = wide.rows()
    if caps is None:  # the top-B is the head of the wider pool
        return pool_idx[:budget], pool_scores[:budget], pool_rows[:budget], pool_idx, pool_rows
    indices, scores = top.result()
    return indices, scores, top.rows(), pool_idx, pool_rows


def _max_l1(rows: np.ndarray) -> float:
    """``max_i ‖rows_i‖₁`` (0 for no rows), a chunk of rows at a time."""
    best = 0.0
    for start in range(0, len(rows), _COPY_ROWS):
        part = np.abs(rows[start : start + _COPY_ROWS]).sum(axis=1, dtype=np.float64)
        best = max(best, float(part.max()))
    return best


def _score_floor(
    scores: np.ndarray,
    count: int,
    margin: float,
    dom: np.ndarray | None = None,
    caps: np.ndarray | None = None,
) -> float:
    """A score the top-``count`` (within caps) of a superset of these rows cannot fall below.

    For any threshold t, the number of rows the capped top-B takes at score >= t is
    ``Σ_d min(cap_d, #{i in d: score_i >= t})``, which only grows when rows are added; so the
    B-th score over all rows is at least the B-th over any subset of them (here: the rows held
    in memory, scored with this pass's direction). Rows scoring below it can be dropped as they
    stream in. ``margin`` lowers it by what float32 products of the same rows computed with
    another blocking can differ by; -inf when fewer than ``count`` rows qualify.
    """
    if len(scores) < count or count < 1:
        return -np.inf
    if caps is None:
        kth = float(np.partition(scores, len(scores) - count)[len(scores) - count])
    else:
        chosen = _top_b_in_memory((np.arange(len(scores)), -scores), count, dom, caps)
        if len(chosen) < count:
            return -np.inf
        kth = float(scores[chosen].min())
    return kth - margin


def _gather_rows(wanted: np.ndarray, *sources: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """``[len(wanted), k]`` float32 rows for the row indices ``wanted`` (sorted, unique),
    each found in one of ``sources`` = ``(indices, rows)`` pairs."""
    k = sources[0][1].shape[1] if len(sources[0][1]) else 0
    out = np.empty((len(wanted), k), dtype=np.float32)
    found = np.zeros(len(wanted), dtype=bool)
    for src_idx, src_rows in sources:
        if len(src_idx) == 0:
            continue
        order = np.argsort(src_idx)
        pos = np.minimum(np.searchsorted(src_idx, wanted, sorter=order), len(src_idx) - 1)
        hit = (src_idx[order[pos]] == wanted) & ~found
        targets = np.flatnonzero(hit)
        for start in range(0, len(targets), _COPY_ROWS):
            part = targets[start : start + _COPY_ROWS]
            out[part] = src_rows[order[pos[part]]]
        found |= hit
    if not found.all():
        raise AssertionError("internal: rows missing from the pass results")
    return out


def _top_b_in_memory(
    keys: tuple[np.ndarray, ...],
    budget: int,
    dom: np.ndarray | None,
    caps: np.ndarray | None,
) -> np.ndarray:
    """Positions of the top-``budget`` items, sorted by ``keys`` (last key primary, descending
    for every key but the first, which is the ascending tie-break), within per-domain caps."""
    order = np.lexsort(keys)
    if caps is not None:
        order = order[_within_caps(dom[order], caps)]
    return order[:budget]


def _vertex(
    scores: np.ndarray, budget: int, dom: np.ndarray | None, caps: np.ndarray | None
) -> np.ndarray:
    """Positions of the top-``budget`` scores within caps (fast path without caps)."""
    if caps is None:
        if budget >= len(scores):
            return np.arange(len(scores))
        return np.argpartition(-scores, budget - 1)[:budget]
    return _top_b_in_memory((np.arange(len(scores)), -scores), budget, dom, caps)


def _rows_dot(rows: np.ndarray, weights: np.ndarray, chunk: int = _COPY_ROWS) -> np.ndarray:
    """``rowsᵀ @ weights``: float32 products within a chunk of rows (the rows are float32),
    chunks summed in float64 — relative error ~1e-6, 4-5× faster than converting the rows
    to float64 (the in-memory solve calls this every iteration; final values of integer sets
    use ``_sum_rows``, exact in float64)."""
    out = np.zeros(rows.shape[1])
    w32 = np.asarray(weights, dtype=np.float32)
    for start in range(0, len(rows), chunk):
        out += (w32[start : start + chunk] @ rows[start : start + chunk]).astype(np.float64)
    return out


def _solve_restricted(
    objective: SelectionObjective,
    rows: np.ndarray,
    x: np.ndarray,
    budget: int,
    dom: np.ndarray | None,
    caps: np.ndarray | None,
    iters: int,
    tol: float,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Conditional gradient on the relaxation restricted to the rows in memory.

    ``rows`` [M, k] float32, ``x`` [M] a feasible start. Returns ``(x, s, iterations)``;
    stops when the gap ``⟨∇F(s), s_V − s⟩`` is at most ``tol``. One ``[M, k]`` product per
    iteration: the vertex's summed sketch is updated from the rows that entered or left it.
    """
    s = _rows_dot(rows, x)
    member = np.zeros(len(x), dtype=bool)
    s_vertex = np.zeros(rows.shape[1])
    done = 0
    while done < iters:
        done += 1
        grad = objective.gradient(s)
        scores = rows @ grad.astype(np.float32)
        new_member = np.zeros(len(x), dtype=bool)
        new_member[_vertex(scores, budget, dom, caps)] = True
        entered = np.flatnonzero(new_member & ~member)
        left = np.flatnonzero(member & ~new_member)
        if len(entered) + len(left) > budget // 2:
            s_vertex = _rows_dot(rows, new_member.astype(np.float64))
        else:
            s_vertex = s_vertex + _sum_rows(rows, entered) - _sum_rows(rows, left)
        member = new_member
        direction = s_vertex - s
        if grad @ direction <= tol:
            break
        gamma = objective.line_search(s, direction)
        if gamma <= 0.0:
            break
        x *= 1.0 - gamma
        x[member] += gamma
        s = s + gamma * direction
    return x, _rows_dot(rows, x), done


def _greedy_completion(
    objective: SelectionObjective,
    rows: np.ndarray,
    x: np.ndarray,
    budget: int,
    dom: np.ndarray | None,
    caps: np.ndarray | None,
    max_work: float,
) -> np.ndarray | None:
    """Round the relaxed ``x``: keep the examples with ``x = 1`` and fill the remaining slots
    by exact greedy over the other rows in memory (fractional ones first if the pool is
    too large). Returns positions ``[budget]``, or None when that would exceed ``max_work``
    (slots × pool rows)."""
    whole = np.flatnonzero(x >= 1.0 - 1e-9)
    if len(whole) >= budget or len(x) == 0:
        return None  # nothing fractional: the x-rounding already is this set
    slots = budget - len(whole)
    pool = np.flatnonzero(x < 1.0 - 1e-9)
    if slots * len(pool) > max_work:
        pool = pool[x[pool] > 1e-12]
        if slots * len(pool) > max_work or len(pool) < slots:
            return None
    left = None
    if caps is not None:
        left = caps - np.bincount(dom[whole], minlength=len(caps))
        if (
            np.minimum(np.maximum(left, 0), np.bincount(dom[pool], minlength=len(caps))).sum()
            < slots
        ):
            return None
    feats = rows[pool].astype(np.float64)
    base = _sum_rows(rows, whole)
    chosen, _, _, _ = greedy_extend(
        feats, objective, slots, base, None if dom is None else dom[pool], left
    )
    return np.concatenate([whole, pool[chosen]])


def stream_select(
    phi: Any,
    objective: SelectionObjective,
    budget: int,
    domains: np.ndarray | None = None,
    caps: np.ndarray | None = None,
    max_iters: int = 20,
    block_rows: int = 262_144,
    inner_iters: int = 100,
    extra_rows: int | None = None,
    tol: float = 1e-3,
    completion_work: float = 1e7,
    progress: bool = True,
    prefetch: bool = True,
) -> Selection:
    """Select ``budget`` examples by iterated linearization, one pass over ``phi`` per iteration.

    Args:
        phi: ``[N, k]`` sketches: a numpy array, a Zarr array, or anything sliceable by rows.
        objective: the surrogate objective (its ``scale`` should already reflect ``budget``).
        budget: B.
        domains: ``[N]`` integer domain codes (in memory), needed with ``caps``.
        caps: ``[D]`` max number of selected examples per domain code.
        max_iters: most passes over ``phi``.
        block_rows: rows read per block (a multiple of the Zarr chunk rows reads best).
        inner_iters: conditional-gradient steps on the rows in memory between passes.
        extra_rows: rows beyond the top-B (by linearized gain, ignoring caps) that each pass
            also brings into memory as candidates; None = max(B, 1024). More rows, fewer passes.
        tol: stop when the conditional-gradient gap is at most ``tol`` times the objective's
            gain over the empty sketch (``|F(s) − F(0)|``).
        completion_work: most (open slots × candidate rows) for the greedy rounding of the
            final relaxed point (skipped above it; the plain x-rounding is always done).
        progress: show a tqdm bar over blocks for each pass.
        prefetch: read the next block in a background thread.

    Returns:
        A :class:`Selection`: the best integer set found (indices by decreasing linearized
        gain), ``passes`` (full reads of ``phi``), per-pass ``history``, ``converged``.
    """
    n = int(phi.shape[0])
    if len(phi.shape) != 2 or phi.shape[1] < objective.dim:
        raise ValueError(f"phi must be [N, >= {objective.dim}], got {tuple(phi.shape)}")
    if max_iters < 1:
        raise ValueError("max_iters must be at least 1")
    domains, caps = check_constraints(n, budget, domains, caps)
    k = objective.dim
    base_value = float(objective.value(np.zeros(k)))
    if extra_rows is None:
        extra_rows = max(budget, 1024)

    support = np.empty(0, dtype=np.int64)  # row indices held in memory (unique, unsorted)
    row_l1 = 0.0  # largest ‖φ_i‖₁ among them (bounds float32 rounding of their scores)
    held_scores = np.empty(0, dtype=np.float32)  # their scores at the current s
    rows = np.empty((0, k), dtype=np.float32)
    x = np.empty(0)
    s = np.zeros(k)
    history: list[dict[str, float]] = []
    # the best integer set seen: (F, indices, linearized gains, Σ rows)
    best: tuple[float, np.ndarray, np.ndarray, np.ndarray] | None = None
    converged = False

    def consider(value: float, indices: np.ndarray, gains: np.ndarray, s_set: np.ndarray) -> None:
        nonlocal best
        if best is None or value > best[0]:
            best = (value, indices, gains, s_set)

    for it in range(max_iters):
        grad = objective.gradient(s)
        floors = (-np.inf, -np.inf)
        if len(support):  # the rows in memory bound this pass's cut-offs from below
            # ``held_scores``: rows @ ∇F(s) from the last rounding step, the same s and rows
            held = held_scores.astype(np.float64)
            held_dom = None if domains is None else domains[support]
            # |float32 dot − exact| <= k·ε·Σ_j |φ_ij g_j| <= k·ε·‖φ_i‖₁‖g‖∞, for either product
            margin = 4.0 * k * float(np.finfo(np.float32).eps) * row_l1 * np.abs(grad).max()
            floors = (
                _score_floor(held, budget, margin, held_dom, caps),
                _score_floor(held, min(n, budget + extra_rows), margin),
            )
        v_idx, v_scores, v_rows, p_idx, p_rows = _top_b_pass(
            phi,
            grad,
            budget,
            domains,
            caps,
            block_rows,
            prefetch,
            progress,
            f"select pass {it + 1}",
            pool=min(n, budget + extra_rows),
            floors=floors,
        )
        s_vertex = _sum_rows(v_rows)
        vertex_value = float(objective.value(s_vertex))
        gap = float(grad @ (s_vertex - s))
        # the gap bounds F* − F(s) on the relaxation; tolerances are relative to F's gain
        scale_ref = abs((float(objective.value(s)) if it else vertex_value) - base_value)
        fresh = ~np.isin(v_idx, support, assume_unique=True)
        record = {
            "pass": float(it + 1),
            "vertex": vertex_value,
            "gap": gap,
            "new": float(fresh.sum()),
        }
        fresh_rows = np.union1d(v_idx[fresh], p_idx[~np.isin(p_idx, support, assume_unique=True)])
        consider(record["vertex"], v_idx, v_scores, s_vertex)
        if it > 0 and (not fresh.any() or gap <= tol * scale_ref):
            record.update(
                relaxed=float(objective.value(s)), rounded=history[-1]["rounded"], inner=0.0
            )
            history.append(record)
            converged = True
            break
        # append the new rows (x = 0 there); the support is not kept sorted (no big reshuffle)
        new_rows = _gather_rows(fresh_rows, (v_idx, v_rows), (p_idx, p_rows))
        row_l1 = max(row_l1, _max_l1(new_rows))
        support = np.concatenate([support, fresh_rows])
        rows = np.concatenate([rows, new_rows]) if len(rows) else new_rows
        x = np.concatenate([x, np.zeros(len(fresh_rows))])
        if it == 0:  # s = 0 is infeasible (Σx = 0): start at the first vertex
            x[np.searchsorted(support, v_idx)] = 1.0
            s = s_vertex.copy()
        dom = None if domains is None else domains[support]
        x, s, inner = _solve_restricted(
            objective, rows, x, budget, dom, caps, inner_iters, 0.1 * tol * scale_ref
        )
        # round the relaxed point: the B largest x (ties: larger linearized gain, lower index)
        scores = held_scores = rows @ objective.gradient(s).astype(np.float32)
        rounded = _top_b_in_memory((support, -scores, -x), budget, dom, caps)
        s_rounded = _sum_rows(rows, rounded)
        rounded_value = float(objective.value(s_rounded))
        consider(rounded_value, support[rounded], scores[rounded], s_rounded)
        record.update(relaxed=float(objective.value(s)), rounded=rounded_value, inner=float(inner))
        history.append(record)

    # greedy rounding of the final relaxed point (exact gains, rows in memory)
    dom = None if domains is None else domains[support]
    completed = _greedy_completion(objective, rows, x, budget, dom, caps, completion_work)
    if completed is not None:
        scores = rows @ objective.gradient(s).astype(np.float32)
        s_completed = _sum_rows(rows, completed)
        completed_value = float(objective.value(s_completed))
        history[-1]["completed"] = completed_value
        consider(completed_value, support[completed], scores[completed], s_completed)
    assert best is not None
    value, chosen, gains, s_best = best
    gains = gains.astype(np.float64)
    order = np.lexsort((chosen, -gains))
    return Selection(
        indices=chosen[order],
        gains=gains[order],
        value=value,
        s=s_best,
        algorithm="stream",
        passes=len(history),
        history=history,
        converged=converged,
    )


def additive_top_b(
    phi: Any,
    objective: SelectionObjective,
    budget: int,
    domains: np.ndarray | None = None,
    caps: np.ndarray | None = None,
    block_rows: int = 262_144,
    progress: bool = False,
    prefetch: bool = True,
) -> Selection:
    """The additive baseline: the top-B examples (within caps) by standalone linear score.

    Each example is scored alone by ``scale·⟨ū, φ_i⟩`` (ū the weighted mean of the
    scenarios' linear terms), ignoring every interaction — the "sum of isolated scores"
    rule of TRAK / gradient-similarity selection. One pass over ``phi``.
    """
    n = int(phi.shape[0])
    domains, caps = check_constraints(n, budget, domains, caps)
    direction = objective.scale * objective.mean_linear()
    indices, scores, rows, _, _ = _top_b_pass(
        phi, direction, budget, domains, caps, block_rows, prefetch, progress, "additive"
    )
    s = _sum_rows(rows)
    return Selection(
        indices=indices,
        gains=scores.astype(np.float64),
        value=float(objective.value(s)),
        s=s,
        algorithm="additive",
        passes=1,
    )
