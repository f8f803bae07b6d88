"""Sharding: which work units this process owns, and durable per-unit completion markers.

A shard is ``(index, count)``: from ``--shard/--num-shards`` or from
``SLURM_ARRAY_TASK_ID`` / ``SLURM_ARRAY_TASK_COUNT``. Work is split into units
(row chunks, subsets); shard ``i`` of ``n`` owns a contiguous run of them. A
unit's marker is written only after its output is durable, so a rerun skips
finished units and a killed job loses only the unit it was working on.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from grasp_cli.artifacts.atomic import atomic_write_text
from grasp_cli.artifacts.layout import BOOKKEEPING
from grasp_cli.errors import UsageError


@dataclass(frozen=True)
class ShardSpec:
    index: int = 0
    count: int = 1

    @property
    def is_whole(self) -> bool:
        return self.count == 1

    def __str__(self) -> str:
        return f"shard {self.index + 1}/{self.count}"


def resolve_shard(index: int | None, count: int | None) -> ShardSpec:
    """Flags win; otherwise SLURM array variables; otherwise the whole job (0 of 1)."""
    if index is None and count is None and "SLURM_ARRAY_TASK_ID" in os.environ:
        task_id = _slurm_int("SLURM_ARRAY_TASK_ID", None)
        task_min = _slurm_int("SLURM_ARRAY_TASK_MIN", 0)
        step = _slurm_int("SLURM_ARRAY_TASK_STEP", 1) or 1
        count = _slurm_int("SLURM_ARRAY_TASK_COUNT", 1)
        offset = task_id - task_min
        if offset % step:
            raise UsageError(
                f"SLURM array task {task_id} is not on the array's grid; submit --array=0-{count - 1}"
            )
        index = offset // step
    index = 0 if index is None else index
    count = 1 if count is None else count
    if count < 1 or not 0 <= index < count:
        raise UsageError(
            f"--shard {index} --num-shards {count}: need 0 <= shard < num-shards "
            "(SLURM arrays: submit a contiguous --array=0-(N-1))"
        )
    return ShardSpec(index, count)


def _slurm_int(name: str, default: int | None) -> int:
    """An integer SLURM variable (``default`` when unset or empty); anything else is a usage error."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        if default is None:
            raise UsageError(f"{name} is set but empty; unset it or run inside a SLURM array")
        return default
    try:
        return int(raw)
    except ValueError:
        raise UsageError(
            f"{name}={raw!r} is not an integer; unset it or run inside a SLURM array"
        ) from None


def owned_units(num_units: int, shard: ShardSpec, costs: list[float] | None = None) -> range:
    """The contiguous run of unit indices that ``shard`` owns.

    Without ``costs``: balanced to within one unit. With ``costs`` (one estimate per unit,
    e.g. rows to process): balanced by cost — unit ``u`` belongs to the shard whose share of
    the total cost holds the midpoint of ``u``'s cost interval, so one expensive unit does not
    leave one shard doing twice the work. Deterministic: every shard computes the same split.
    """
    if costs is None or shard.count == 1:
        start = num_units * shard.index // shard.count
        stop = num_units * (shard.index + 1) // shard.count
        return range(start, stop)
    if len(costs) != num_units or any(not c >= 0 for c in costs):
        raise ValueError(f"costs must be {num_units} non-negative numbers")
    total = float(sum(costs)) or 1.0
    owners, before = [], 0.0
    for cost in costs:
        owners.append(min(shard.count - 1, int((before + cost / 2) / total * shard.count)))
        before += cost
    mine = [u for u, owner in enumerate(owners) if owner == shard.index]
    return range(mine[0], mine[-1] + 1) if mine else range(0)


class UnitMarkers:
    """Completion markers for the units of one artifact: ``<artifact>/_grasp/done/<unit>.json``."""

    def __init__(self, artifact_dir: Path) -> None:
        self.folder = Path(artifact_dir) / BOOKKEEPING / "done"

    def _path(self, unit: int) -> Path:
        return self.folder / f"{unit:06d}.json"

    def is_done(self, unit: int) -> bool:
        return self._path(unit).is_file()

    def mark_done(self, unit: int, **info: object) -> None:
        info = {
            "unit": unit,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "pid": os.getpid(),
            **info,
        }
        atomic_write_text(self._path(unit), json.dumps(info, default=str))

    def done_units(self) -> set[int]:
        if not self.folder.is_dir():
            return set()
        return {int(p.stem) for p in self.folder.glob("*.json") if p.stem.isdigit()}

    def missing(self, num_units: int) -> list[int]:
        done = self.done_units()
        return [unit for unit in range(num_units) if unit not in done]

    def info(self, unit: int) -> dict:
        """What ``mark_done`` recorded for ``unit`` ({} for an unreadable marker)."""
        try:
            return json.loads(self._path(unit).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}
