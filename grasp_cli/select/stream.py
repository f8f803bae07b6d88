"""Streaming selection for corpora whose sketches live on disk (Zarr) or are too many for greedy.

Iterated linearization = conditional gradient (Frank–Wolfe) on the relaxation
``x ∈ [0, 1]^N, Σ x = B`` (plus per-domain caps), with ``s = Σ_i x_i φ_i``. Each
iteration is ONE pass over the sketch array, block by block:

1. score every example by its linearized gain ``g_i = ⟨∇_s F(s), φ_i⟩``;
2. keep a streaming top-B (per block ``np.argpartition``, merged with the running top-B;
   with caps, the top-B among each domain's top-cap), and accumulate the summed sketch of
   the running top-B set at the same time (rows of examples that entered it are kept,
   and compacted to those still in it);
3. after the pass, step ``s ← s + γ (s_V − s)`` towards that vertex (exact line search).

It stops when the top-B set stops changing (or after ``max_iters`` passes). The answer is
an integer set of size B: the top-B set of a linearization — the last one, or an earlier
one if its F was higher (every pass evaluates its set's F exactly, at no extra read).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from grasp_cli.select.objective import Selection, SelectionObjective, check_constraints


def _n_rows(phi: Any) -> int:
    return int(phi.shape[0])


def iter_blocks(
    phi: Any,
    block_rows: int,
    k: int,
    prefetch: bool = True,
    progress: bool = False,
    desc: str = "pass",
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, block [rows, k] float32)`` for contiguous row blocks of ``phi``.

    ``phi`` is anything sliceable by rows with a ``shape`` (numpy, Zarr, memmap). Columns
    beyond ``k`` are dropped. With ``prefetch`` the next block is read in a background
    thread while the caller works on the current one (Zarr decompression releases the GIL).
    """
    n = _n_rows(phi)
    if block_rows < 1:
        raise ValueError(f"block_rows must be positive, got {block_rows}")
    starts = list(range(0, n, block_rows))

    def read(start: int) -> np.ndarray:
        block = np.asarray(phi[start : min(start + block_rows, n)])
        block = block[:, :k]
        if block.dtype != np.float32:
            block = block.astype(np.float32)
        return block

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(starts), desc=desc, unit="block", leave=False)
    try:
        if not prefetch or len(starts) <= 1:
            for start in starts:
                yield start, read(start)
                if bar is not None:
                    bar.update(1)
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(read, starts[0])
            for pos, start in enumerate(starts):
                block = future.result()
                if pos + 1 < len(starts):
                    future = pool.submit(read, starts[pos + 1])
                yield start, block
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()


class StreamingTopB:
    """The top-``budget`` rows by score over a stream of blocks, optionally with per-domain caps.

    Ties break towards the lower row index, so the result does not depend on block sizes.
    With ``keep_rows`` the summed features of the final set are available at the end.
    """

    def __init__(self, budget: int, caps: np.ndarray | None = None, keep_rows: bool = True) -> None:
        self.budget = budget
        self.caps = caps
        self.keep_rows = keep_rows
        self.idx = np.empty(0, dtype=np.int64)
        self.score = np.empty(0, dtype=np.float64)
        self.dom = np.empty(0, dtype=np.int64)
        self._row_idx: list[np.ndarray] = []
        self._rows: list[np.ndarray] = []
        self._stored = 0

    def push(
        self,
        idx: np.ndarray,
        score: np.ndarray,
        rows: np.ndarray | None = None,
        dom: np.ndarray | None = None,
    ) -> None:
        """Offer examples ``idx`` [m] with ``score`` [m] (and their ``rows`` [m, k], ``dom`` [m])."""
        budget = self.budget
        score = np.asarray(score, dtype=np.float64)
        keep = np.arange(len(idx))
        if len(self.idx) >= budget:  # nothing below the current B-th score can enter
            keep = keep[score >= self.score[-1]]
        if self.caps is None and len(keep) > budget:
            part = np.argpartition(-score[keep], budget - 1)
            cut = score[keep][part[budget - 1]]
            keep = keep[score[keep] >= cut]  # keep ties at the cut for index tie-breaking
        if len(keep) == 0:
            return
        all_idx = np.concatenate([self.idx, idx[keep]])
        all_score = np.concatenate([self.score, score[keep]])
        all_dom = None
        if self.caps is not None:
            all_dom = np.concatenate([self.dom, np.asarray(dom)[keep]])
        order = np.lexsort((all_idx, -all_score))
        if self.caps is not None:
            order = order[_within_caps(all_dom[order], self.caps)]
        order = order[:budget]
        self.idx, self.score = all_idx[order], all_score[order]
        if all_dom is not None:
            self.dom = all_dom[order]
        if self.keep_rows:
            entered = keep[np.isin(idx[keep], self.idx, assume_unique=True)]
            if len(entered):
                self._row_idx.append(np.asarray(idx[entered], dtype=np.int64))
                self._rows.append(np.asarray(rows[entered]))
                self._stored += len(entered)
            if self._stored > 2 * budget:
                self._compact()

    def _compact(self) -> None:
        if not self._rows:
            return
        row_idx = np.concatenate(self._row_idx)
        rows = np.concatenate(self._rows)
        alive = np.isin(row_idx, self.idx, assume_unique=True)
        self._row_idx, self._rows = [row_idx[alive]], [rows[alive]]
        self._stored = int(alive.sum())

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(indices [<=B], scores)`` by decreasing score (ties: lower index first)."""
        return self.idx.copy(), self.score.copy()

    def rows(self) -> np.ndarray:
        """``[<=B, k]`` the rows of the current top set, in the order of :meth:`result`."""
        if not self.keep_rows:
            raise RuntimeError("StreamingTopB(keep_rows=False) keeps no rows")
        self._compact()
        if not self._rows:
            return np.empty((0, 0), dtype=np.float32)
        row_idx, rows = self._row_idx[0], self._rows[0]
        order = np.argsort(row_idx)
        return rows[order[np.searchsorted(row_idx[order], self.idx)]]


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
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass: top-B of ``phi @ direction`` within caps → (indices, scores, rows [B, k])."""
    k = len(direction)
    top = StreamingTopB(budget, caps=caps, keep_rows=True)
    dir32 = direction.astype(np.float32)
    for start, block in iter_blocks(phi, block_rows, k, prefetch=prefetch, progress=progress, desc=desc):
        scores = block @ dir32
        idx = np.arange(start, start + len(block), dtype=np.int64)
        dom = None if domains is None else domains[start : start + len(block)]
        top.push(idx, scores, rows=block, dom=dom)
    indices, scores = top.result()
    return indices, scores, top.rows()


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
    stops when the gap ``⟨∇F(s), s_V − s⟩`` is at most ``tol``.
    """
    s = rows.T.astype(np.float64) @ x
    done = 0
    for done in range(1, iters + 1):
        grad = objective.gradient(s)
        scores = rows @ grad.astype(np.float32)
        vertex = _vertex(scores, budget, dom, caps)
        indicator = np.zeros(len(x), dtype=np.float32)
        indicator[vertex] = 1.0
        s_vertex = (indicator @ rows).astype(np.float64)
        direction = s_vertex - s
        if grad @ direction <= tol:
            break
        gamma = objective.line_search(s, direction)
        if gamma <= 0.0:
            break
        x *= 1.0 - gamma
        x[vertex] += gamma
        s = s + gamma * direction
    s = rows.T.astype(np.float64) @ x
    return x, s, done


def stream_select(
    phi: Any,
    objective: SelectionObjective,
    budget: int,
    domains: np.ndarray | None = None,
    caps: np.ndarray | None = None,
    max_iters: int = 20,
    block_rows: int = 262_144,
    inner_iters: int = 100,
    tol: float = 1e-4,
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
        tol: stop when the conditional-gradient gap is at most ``tol`` times the objective's
            gain over the empty sketch (``|F(s) − F(0)|``).
        progress: show a tqdm bar over blocks for each pass.
        prefetch: read the next block in a background thread.

    Returns:
        A :class:`Selection`: indices by decreasing linearized gain at the final
        linearization, ``passes`` (full reads of ``phi``), per-pass ``history``.
    """
    n = _n_rows(phi)
    if len(phi.shape) != 2 or phi.shape[1] < objective.dim:
        raise ValueError(f"phi must be [N, >= {objective.dim}], got {tuple(phi.shape)}")
    if max_iters < 1:
        raise ValueError("max_iters must be at least 1")
    domains, caps = check_constraints(n, budget, domains, caps)
    k = objective.dim
    base_value = float(objective.value(np.zeros(k)))

    support = np.empty(0, dtype=np.int64)  # sorted row indices held in memory
    rows = np.empty((0, k), dtype=np.float32)
    x = np.empty(0)
    s = np.zeros(k)
    history: list[dict[str, float]] = []
    best: tuple[float, np.ndarray, np.ndarray] | None = None  # (F, positions in support, -)
    converged = False

    def consider(value: float, chosen: np.ndarray) -> None:
        nonlocal best
        if best is None or value > best[0]:
            best = (value, support[chosen], rows[chosen].sum(axis=0, dtype=np.float64))

    for it in range(max_iters):
        grad = objective.gradient(s)
        v_idx, v_scores, v_rows = _top_b_pass(
            phi, grad, budget, domains, caps, block_rows, prefetch, progress, f"select pass {it + 1}"
        )
        s_vertex = v_rows.sum(axis=0, dtype=np.float64)
        gap = float(grad @ (s_vertex - s))
        scale_ref = abs(float(objective.value(s)) - base_value) if it else 0.0
        fresh = ~np.isin(v_idx, support, assume_unique=True)
        record = {
            "pass": float(it + 1),
            "vertex": float(objective.value(s_vertex)),
            "gap": gap,
            "new": float(fresh.sum()),
        }
        if it > 0 and (not fresh.any() or gap <= tol * scale_ref):
            record.update(relaxed=float(objective.value(s)), rounded=history[-1]["rounded"], inner=0.0)
            history.append(record)
            converged = True
            break
        # add the new examples to the rows in memory (x = 0 there), keep the support sorted
        support = np.concatenate([support, v_idx[fresh]])
        rows = np.concatenate([rows, v_rows[fresh].astype(np.float32)])
        x = np.concatenate([x, np.zeros(int(fresh.sum()))])
        order = np.argsort(support, kind="stable")
        support, rows, x = support[order], rows[order], x[order]
        dom = None if domains is None else domains[support]
        if it == 0:
            x[:] = 1.0  # s = 0 is infeasible (Σx = 0): start at the first vertex
            s = s_vertex.copy()
        consider(record["vertex"], np.searchsorted(support, v_idx))
        x, s, inner = _solve_restricted(
            objective, rows, x, budget, dom, caps, inner_iters, tol * max(abs(record["vertex"] - base_value), 1e-300)
        )
        # round the relaxed point: the B largest x (ties: larger linearized gain, lower index)
        scores = rows @ objective.gradient(s).astype(np.float32)
        rounded = _top_b_in_memory((support, -scores, -x), budget, dom, caps)
        rounded_value = float(objective.value(rows[rounded].sum(axis=0, dtype=np.float64)))
        consider(rounded_value, rounded)
        record.update(relaxed=float(objective.value(s)), rounded=rounded_value, inner=float(inner))
        history.append(record)

    assert best is not None
    value, chosen, s_best = best
    final_scores = rows @ objective.gradient(s).astype(np.float32)
    gains = final_scores[np.searchsorted(support, chosen)].astype(np.float64)
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
    n = _n_rows(phi)
    domains, caps = check_constraints(n, budget, domains, caps)
    direction = objective.scale * objective.mean_linear()
    indices, scores, rows = _top_b_pass(
        phi, direction, budget, domains, caps, block_rows, prefetch, progress, "additive"
    )
    s = rows.sum(axis=0, dtype=np.float64)
    return Selection(
        indices=indices,
        gains=scores.astype(np.float64),
        value=float(objective.value(s)),
        s=s,
        algorithm="additive",
        passes=1,
    )
