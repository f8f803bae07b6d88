"""Budgeted, interaction-aware data selection (pipeline step 5).

Maximize ``F(S) = Σ_t w_t Û_t(S) / σ_t`` (or a robust lower confidence bound across tasks or
bootstrap refits) subject to ``|S| = B`` and optional per-domain caps:

- :func:`greedy_select` — exact lazy greedy, sketches in memory (small N);
- :func:`stream_select` — iterated linearization (conditional gradient), one streamed pass
  over the sketch array per iteration (large N, Zarr);
- :func:`additive_top_b` — the additive baseline (top-B by standalone alignment score);
- :func:`select` — picks greedy or stream the way ``select.algorithm = 'auto'`` says.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from grasp_cli.artifacts.sketches import iter_blocks
from grasp_cli.select.greedy import greedy_select
from grasp_cli.select.objective import (
    ROBUST_MODES,
    Selection,
    SelectionObjective,
    aggregation_scale,
    budget_count,
    check_constraints,
    domain_caps,
    objective_from_bootstrap,
    objective_from_tasks,
)
from grasp_cli.select.stream import StreamingTopB, additive_top_b, stream_select

__all__ = [
    "ROBUST_MODES",
    "Selection",
    "SelectionObjective",
    "StreamingTopB",
    "additive_top_b",
    "aggregation_scale",
    "budget_count",
    "check_constraints",
    "domain_caps",
    "greedy_select",
    "iter_blocks",
    "objective_from_bootstrap",
    "objective_from_tasks",
    "select",
    "stream_select",
]


def select(
    phi: Any,
    objective: SelectionObjective,
    budget: int,
    algorithm: str = "auto",
    domains: np.ndarray | None = None,
    caps: np.ndarray | None = None,
    greedy_max_n: int = 50_000,
    max_iters: int = 20,
    block_rows: int = 262_144,
    progress: bool = True,
) -> Selection:
    """Run the selection algorithm named by ``select.algorithm``.

    ``'auto'`` runs exact greedy when ``N <= greedy_max_n`` (reading ``phi`` into memory)
    and the streaming method above that. ``phi`` is ``[N, k >= objective.dim]``, in memory
    or a Zarr array.
    """
    n = int(phi.shape[0])
    if algorithm == "auto":
        algorithm = "greedy" if n <= greedy_max_n else "stream"
    if algorithm == "greedy":
        return greedy_select(np.asarray(phi[:, : objective.dim]), objective, budget, domains, caps)
    if algorithm == "stream":
        return stream_select(
            phi,
            objective,
            budget,
            domains,
            caps,
            max_iters=max_iters,
            block_rows=block_rows,
            progress=progress,
        )
    raise ValueError(f"algorithm {algorithm!r}: choose 'auto', 'greedy' or 'stream'")
