"""The unit runner: how every sharded stage (sketch, retrain-subsets, score) does its work.

A sharded artifact's work is ``n_units`` independent units (row chunks, training runs,
score parts). ``run_units`` owns everything around a unit, once for all stages (datatrove's
executor is the model):

1. create the artifact (skeleton + pending manifest) or reuse a matching one, under a lock;
2. take this shard's contiguous run of units, skip the finished ones (``--force`` redoes
   them), optionally in a preferred order and at most ``limit`` of them;
3. call ``work(units)`` for a group of units (usually one; several for vmapped training)
   and write each unit's completion marker with what ``work`` returned for it (chunk or
   file digests), only after its output is durable;
4. report progress (a bar on a terminal, timestamped log lines otherwise) and, when every
   unit of every shard is done, mark the artifact complete.

A killed job loses only the units in flight; a rerun does exactly what is missing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grasp_cli.artifacts.sharded import finish_if_complete, open_sharded
from grasp_cli.artifacts.shards import UnitMarkers, owned_units
from grasp_cli.context import StageContext
from grasp_cli.progress import Progress

UnitInfo = dict[str, Any]


@dataclass
class UnitReport:
    """What one call of ``run_units`` did."""

    folder: Path
    total: int
    done: list[int]
    left: int
    complete: bool
    elapsed_s: float
    weight: float  # rows, runs, ... done (what ``weight`` counted)

    @property
    def state(self) -> str:
        if self.complete:
            return f"{self.folder} complete"
        return f"{self.left} of {self.total} units left for other shards or a rerun"

    def rate(self, unit: str) -> str:
        if not self.done or self.elapsed_s <= 0:
            return "nothing to do"
        return f"{self.weight / self.elapsed_s:.3g} {unit}/s"


def run_units(
    ctx: StageContext,
    artifact: str,
    n_units: int,
    work: Callable[[list[int]], Sequence[UnitInfo | None]],
    *,
    skeleton: Callable[[Path], dict[str, dict[str, str]] | None] | None = None,
    seeds: dict[str, int] | None = None,
    extra: dict[str, Any] | None = None,
    limit: int | None = None,
    order: Sequence[int] | None = None,
    group: int = 1,
    weight: Callable[[int], float] = lambda unit: 1.0,
    unit_name: str = "units",
    folder: Path | None = None,
    cost: Callable[[int], float] | None = None,
) -> UnitReport:
    """Run this shard's unfinished units of ``artifact`` through ``work``; see the module doc.

    ``work(units)`` gets up to ``group`` unit indices and returns one marker info per unit
    (``{"digests": ...}`` / ``{"files": ...}`` / None). ``order`` ranks the units for a call
    with ``limit`` (so that ``--limit`` keeps subset designs in proportion; a whole call goes in
    unit order); ``weight(unit)`` is what progress
    counts for a unit (rows for sketch chunks, 1 for a training run). ``folder`` overrides
    where the artifact lives (a round of the closed loop, ``RUN/loop/round-RRR``). ``cost(unit)``
    estimates a unit's work so shards split it evenly (``shards.owned_units``); by default each
    unit counts the same.
    """
    manifest = open_sharded(
        ctx.layout,
        ctx.config,
        artifact,
        skeleton or (lambda folder: None),
        units=n_units,
        force=ctx.force,
        seeds=seeds,
        extra=extra,
        folder=folder,
    )
    folder = ctx.layout.path(artifact) if folder is None else Path(folder)
    markers = UnitMarkers(folder)
    costs = None if cost is None else [float(cost(u)) for u in range(n_units)]
    owned = owned_units(n_units, ctx.shard, costs)
    todo = [u for u in owned if ctx.force or not markers.is_done(u)]
    if limit is not None:  # a partial call takes the units ``order`` ranks first
        if order is not None:
            rank = {unit: position for position, unit in enumerate(order)}
            todo.sort(key=lambda unit: rank.get(unit, len(rank) + unit))
        todo = todo[: max(0, limit)]
    started = time.perf_counter()
    total_weight = float(sum(weight(u) for u in todo))
    done_weight = 0.0
    with Progress(
        int(total_weight), f"{artifact} {ctx.shard}", unit_name, enabled=ctx.progress
    ) as progress:
        for first in range(0, len(todo), max(1, group)):
            units = todo[first : first + max(1, group)]
            infos = list(work(units))
            if len(infos) != len(units):
                raise RuntimeError(f"work returned {len(infos)} results for {len(units)} units")
            for unit, info in zip(units, infos, strict=True):
                markers.mark_done(unit, **(info or {}))
                done_weight += weight(unit)
                progress.update(int(weight(unit)))
    complete = finish_if_complete(folder, manifest)
    return UnitReport(
        folder=folder,
        total=n_units,
        done=todo,
        left=len(markers.missing(n_units)),
        complete=complete,
        elapsed_s=time.perf_counter() - started,
        weight=done_weight,
    )
