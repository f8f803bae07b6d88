"""Artifacts built by many jobs: created once, filled unit by unit, finished by whoever ends last.

The folder is created atomically with a *pending* manifest (``complete: false``)
whose fingerprint is fixed by the config and inputs, so every shard of a job
array agrees on it without talking to the others. Units record completion with
markers; the shard that finds every unit done rewrites the manifest as complete.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from grasp_cli.artifacts.atomic import _tmp_name, creation_lock, replace_dir, sweep_debris
from grasp_cli.artifacts.manifest import Manifest, build_manifest, read_manifest, write_manifest
from grasp_cli.artifacts.shards import UnitMarkers
from grasp_cli.context import StageContext

SHARED_DEBRIS_MIN_AGE_S = 3600.0


def open_sharded(
    ctx: StageContext,
    artifact: str,
    build_skeleton: Callable[[Path], None],
    *,
    units: int,
    seeds: dict[str, int] | None = None,
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """Create ``artifact`` (skeleton + pending manifest) or reuse a matching one; return its manifest.

    A folder made from other inputs or another config is replaced by the first shard of the new
    plan; the shards after it find the new plan and reuse it. ``--force`` never replaces a folder
    whose plan matches (that would delete the other shards' work): the stages redo their units.
    """
    folder = ctx.layout.path(artifact)
    plan = build_manifest(
        ctx.layout,
        artifact,
        ctx.config,
        seeds=seeds,
        extra={**(extra or {}), "units": units},
        complete=False,
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    with creation_lock(folder):
        existing = read_manifest(folder)
        if existing is not None and existing.fingerprint == plan.fingerprint:
            return existing
        # Other jobs may be writing their own temporaries here right now: sweep only old debris.
        sweep_debris(folder.parent, min_age_s=SHARED_DEBRIS_MIN_AGE_S)
        tmp = _tmp_name(folder)
        tmp.mkdir()
        try:
            build_skeleton(tmp)
            write_manifest(tmp, plan)
            if folder.exists():
                replace_dir(tmp, folder)
            else:
                os.rename(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return plan


def finish_if_complete(folder: Path, manifest: Manifest) -> bool:
    """Mark the artifact complete if every unit is done. Safe to call from every shard."""
    units = int(manifest.extra.get("units", 0))
    if UnitMarkers(folder).missing(units):
        return False
    current = read_manifest(folder)
    if current is not None and current.complete and current.fingerprint == manifest.fingerprint:
        return True
    write_manifest(folder, replace(manifest, complete=True))
    return True
