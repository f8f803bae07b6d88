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

from grasp_cli.artifacts.atomic import _tmp_name, replace_dir, sweep_debris
from grasp_cli.artifacts.manifest import Manifest, build_manifest, read_manifest, write_manifest
from grasp_cli.artifacts.shards import UnitMarkers
from grasp_cli.context import StageContext
from grasp_cli.errors import StaleError

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
    """Create ``artifact`` (skeleton + pending manifest) or reuse a matching one; return its manifest."""
    folder = ctx.layout.path(artifact)
    plan = build_manifest(
        ctx.layout,
        artifact,
        ctx.config,
        seeds=seeds,
        extra={**(extra or {}), "units": units},
        complete=False,
    )
    # Look for the folder *before* its manifest: a folder that appears in between was just
    # created by a concurrent shard (with its manifest, atomically) and must not be replaced.
    existed = folder.exists()
    existing = read_manifest(folder)
    if existing is not None and existing.fingerprint == plan.fingerprint and not ctx.force:
        return existing
    if existing is not None or existed:
        if not (ctx.force or ctx.shard.is_whole):
            raise StaleError(
                f"stale: {folder} was made from other inputs or another config; rebuild it once without "
                "--shard (or with --force), then rerun the job array"
            )
        replacing = True
    else:
        replacing = False
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Other jobs of the array may be building their skeletons here right now: sweep only old debris.
    sweep_debris(folder.parent, min_age_s=SHARED_DEBRIS_MIN_AGE_S)
    tmp = _tmp_name(folder)
    tmp.mkdir()
    try:
        build_skeleton(tmp)
        write_manifest(tmp, plan)
        if replacing:
            replace_dir(tmp, folder)
        else:
            try:
                os.rename(tmp, folder)
            except OSError:  # another shard created it first: use theirs
                shutil.rmtree(tmp, ignore_errors=True)
                theirs = read_manifest(folder)
                if theirs is None or theirs.fingerprint != plan.fingerprint:
                    raise StaleError(
                        f"{folder}: created concurrently with a different plan; rerun"
                    ) from None
                return theirs
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
