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


class HeldRows:
    """Ranked rows held in a buffer: ``idx[j]`` (decreasing score, ties to the lower index),
    ``scores[j]``, and its row ``buffer[slots[j]]``; nothing is copied until asked."""

    def __init__(
        self, idx: np.ndarray, scores: np.ndarray, buffer: np.ndarray, slots: np.ndarray
    ) -> None:
        self.idx, self.scores, self.buffer, self.slots = idx, scores, buffer, slots

    def head(self, count: int) -> HeldRows:
        """The first ``count`` (the top-``count`` by score)."""
        return HeldRows(self.idx[:count], self.scores[:count], self.buffer, self.slots[:count])

    def take(self, positions: np.ndarray | None = None) -> np.ndarray:
        """``[m, k]`` float32 copy of the rows at ``positions`` (all, in rank order, when None)."""
        slots = self.slots if positions is None else self.slots[positions]
        out = np.empty((len(slots), self.buffer.shape[1]), dtype=self.buffer.dtype)
        for start in range(0, len(slots), _COPY_ROWS):
            np.take(
                self.buffer,
                slots[start : start + _COPY_ROWS],
                axis=0,
                out=out[start : start + _COPY_ROWS],
            )
        return out

    def total(self) -> np.ndarray:
        """``[k]`` float64 sum of the rows."""
        return _sum_rows(self.buffer, self.slots)


class StreamingTopB:
    """The top-``budget`` rows by score over a stream of blocks, optionally with per-domain caps.

    Blocks must arrive in increasing row order (as :func:`iter_blocks` yields them). Ties
    break towards the lower row index, so the result does not depend on block sizes. Members
    live in fixed ``[budget]`` arrays (and, with ``keep_rows``, a ``[budget, k]`` row buffer):
    a row that enters takes the place of one that leaves, so a block costs O(budget) work and
    copies only the rows that enter, and memory stays O(budget·k).
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
        self.size = 0  # members: positions [0, size) of the arrays below, in no order
        self._idx = np.empty(budget, dtype=np.int64)
        self._score = np.empty(budget, dtype=np.float64)
        self._dom = np.empty(budget, dtype=np.int64) if caps is not None else None
        self._least = -np.inf  # the lowest member score once the set is full
        self._buffer: np.ndarray | None = None  # row of member j at buffer[j]
        self._order: np.ndarray | None = None

    def _decide(
        self, score: np.ndarray, idx: np.ndarray, dom: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Positions of members that leave and of offered rows that enter (sorted by rank)."""
        n_old, budget = self.size, self.budget
        old_score = self._score[:n_old]
        if self.caps is None and n_old + len(score) <= budget:
            return np.empty(0, dtype=np.int64), np.arange(len(score))
        all_score = np.concatenate([old_score, score])
        if self.caps is not None:
            all_idx = np.concatenate([self._idx[:n_old], idx])
            all_dom = np.concatenate([self._dom[:n_old], dom])
            order = np.lexsort((all_idx, -all_score))
            order = order[_within_caps(all_dom[order], self.caps)]
            keep = np.zeros(len(all_score), dtype=bool)
            keep[order[:budget]] = True
        else:
            cut = np.partition(all_score, len(all_score) - budget)[len(all_score) - budget]
            keep = all_score > cut
            ties = np.flatnonzero(all_score == cut)
            if len(ties) > budget - int(keep.sum()):  # the lowest row indices among the ties
                old = ties < n_old
                tie_idx = np.empty(len(ties), dtype=np.int64)
                tie_idx[old] = self._idx[ties[old]]
                tie_idx[~old] = idx[ties[~old] - n_old]
                ties = ties[np.argsort(tie_idx, kind="stable")]
            keep[ties[: budget - int(keep.sum())]] = True
        return np.flatnonzero(~keep[:n_old]), np.flatnonzero(keep[n_old:])

    def push(
        self,
        idx: np.ndarray,
        score: np.ndarray,
        rows: np.ndarray | None = None,
        dom: np.ndarray | None = None,
    ) -> None:
        """Offer rows ``idx`` [m] (increasing, after every row pushed before) with ``score`` [m],
        their ``rows`` [m, k] (with ``keep_rows``) and domain codes ``dom`` [m] (with caps)."""
        score = np.asarray(score, dtype=np.float64)
        bar = max(self._least, self.floor)  # nothing below the B-th score can enter
        cand = np.flatnonzero(score >= bar) if bar > -np.inf else np.arange(len(score))
        if len(cand) == 0:
            return
        self._order = None
        idx = np.asarray(idx, dtype=np.int64)[cand]
        score = score[cand]
        dom = None if self.caps is None else np.asarray(dom, dtype=np.int64)[cand]
        leave, enter = self._decide(score, idx, dom)
        # the entering rows fill the leaving members' places, then the free ones
        grow = len(enter) - len(leave)  # >= 0: the capped top-B never shrinks
        places = np.concatenate([leave, np.arange(self.size, self.size + grow)])
        self.size += grow
        self._idx[places] = idx[enter]
        self._score[places] = score[enter]
        if self._dom is not None:
            self._dom[places] = dom[enter]
        if self.size == self.budget:
            self._least = float(self._score.min())
        if self.keep_rows and len(enter):
            if self._buffer is None:
                self._buffer = np.empty((self.budget, rows.shape[1]), dtype=rows.dtype)
            for start in range(0, len(enter), _COPY_ROWS):
                part = slice(start, start + _COPY_ROWS)
                self._buffer[places[part]] = rows[cand[enter[part]]]

    def _score_order(self) -> np.ndarray:
        if self._order is None:
            n = self.size
            self._order = np.lexsort((self._idx[:n], -self._score[:n]))
        return self._order

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(indices [<=B], scores)`` by decreasing score (ties: lower index first)."""
        order = self._score_order()
        return self._idx[order], self._score[order]

    def held(self) -> HeldRows:
        """The members with their rows, in the order of :meth:`result` (no copy of the rows)."""
        if not self.keep_rows:
            raise RuntimeError("StreamingTopB(keep_rows=False) keeps no rows")
        indices, scores = self.result()
        buffer = self._buffer if self._buffer is not None else np.empty((0, 0), np.float32)
        return HeldRows(indices, scores, buffer, self._score_order())

    def rows(self) -> np.ndarray:
        """``[<=B, k]`` the rows of the current top set, in the order of :meth:`result`."""
        return self.held().take()


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
) -> tuple[HeldRows, HeldRows]:
    """One pass over ``phi`` scoring every row by ``φ_i · direction``.

    Returns ``(vertex, pool)``: the top-B within caps and, when ``pool`` > ``budget``, the
    top-``pool`` rows ignoring caps (extra candidate rows for the in-memory solve; otherwise
    the vertex again), each with its rows. ``floors``: scores the top-B and the pool cannot
    fall below (``_score_floor``), or -inf.
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
        vertex = top.held()
        return vertex, vertex
    held = wide.held()
    if caps is None:  # the top-B is the head of the wider pool
        return held.head(budget), held
    return top.held(), held


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


def _fresh_rows(
    support: np.ndarray, pool: HeldRows, vertex: HeldRows | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(indices [m] increasing, rows [m, k])`` of the pass's rows not in ``support``: the
    pool's, and the ``vertex``'s not in the pool (when given: capped vertices may hold rows
    the uncapped pool does not). One copy of each new row."""
    parts = [(pool, np.flatnonzero(~np.isin(pool.idx, support, assume_unique=True)))]
    if vertex is not None:
        outside = ~np.isin(vertex.idx, support, assume_unique=True)
        outside &= ~np.isin(vertex.idx, pool.idx, assume_unique=True)
        parts.append((vertex, np.flatnonzero(outside)))
    idx = np.concatenate([held.idx[pos] for held, pos in parts])
    order = np.argsort(idx, kind="stable")
    if len(parts) == 1:  # rows copied once, straight into row order
        return idx[order], pool.take(parts[0][1][order])
    rows = np.concatenate([held.take(pos) for held, pos in parts])
    return idx[order], rows[order]


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
        vertex, pool = _top_b_pass(
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
        s_vertex = vertex.total()
        vertex_value = float(objective.value(s_vertex))
        gap = float(grad @ (s_vertex - s))
        # the gap bounds F* − F(s) on the relaxation; tolerances are relative to F's gain
        scale_ref = abs((float(objective.value(s)) if it else vertex_value) - base_value)
        fresh = ~np.isin(vertex.idx, support, assume_unique=True)
        record = {
            "pass": float(it + 1),
            "vertex": vertex_value,
            "gap": gap,
            "new": float(fresh.sum()),
        }
        consider(record["vertex"], vertex.idx, vertex.scores, s_vertex)
        if it > 0 and (not fresh.any() or gap <= tol * scale_ref):
            record.update(
                relaxed=float(objective.value(s)), rounded=history[-1]["rounded"], inner=0.0
            )
            history.append(record)
            converged = True
            break
        # append the new rows (x = 0 there), in row order within the pass; the support is not
        # kept sorted (no big reshuffle). The pool holds the vertex's rows unless caps apply.
        new_idx, new_rows = _fresh_rows(support, pool, None if caps is None else vertex)
        row_l1 = max(row_l1, _max_l1(new_rows))
        support = np.concatenate([support, new_idx])
        rows = np.concatenate([rows, new_rows]) if len(rows) else new_rows
        del new_rows
        x = np.concatenate([x, np.zeros(len(new_idx))])
        if it == 0:  # s = 0 is infeasible (Σx = 0): start at the first vertex
            x[np.isin(support, vertex.idx)] = 1.0
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
    vertex, _ = _top_b_pass(
        phi, direction, budget, domains, caps, block_rows, prefetch, progress, "additive"
    )
    s = vertex.total()
    return Selection(
        indices=vertex.idx,
        gains=vertex.scores.astype(np.float64),
        value=float(objective.value(s)),
        s=s,
        algorithm="additive",
        passes=1,
    )
