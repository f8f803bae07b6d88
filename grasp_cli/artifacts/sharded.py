"""Artifacts built by many jobs: created once, filled unit by unit, finished by whoever ends last.

The folder is created atomically with a *pending* manifest (``complete: false``)
whose fingerprint is fixed by the config and inputs, so every shard of a job
array agrees on it without talking to the others. Units record completion with
markers; the shard that finds every unit done rewrites the manifest as complete.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from grasp_cli.artifacts.atomic import _tmp_name, creation_lock, replace_dir, sweep_debris
from grasp_cli.artifacts.layout import BOOKKEEPING, RunLayout
from grasp_cli.artifacts.manifest import (
    Manifest,
    build_manifest,
    read_manifest_or_none,
    write_manifest,
)
from grasp_cli.artifacts.shards import UnitMarkers
from grasp_cli.config import GraspConfig

SHARED_DEBRIS_MIN_AGE_S = 3600.0


def open_sharded(
    layout: RunLayout,
    config: GraspConfig,
    artifact: str,
    build_skeleton: Callable[[Path], dict[str, dict[str, str]] | None],
    *,
    units: int,
    force: bool = False,
    seeds: dict[str, int] | None = None,
    extra: dict[str, Any] | None = None,
    folder: Path | None = None,
) -> Manifest:
    """Create ``artifact`` (skeleton + pending manifest) or reuse a matching one; return its manifest.

    ``build_skeleton(folder)`` fills a fresh folder and may return chunk digests of the arrays
    it wrote completely (see ``zarr_io.chunk_digests``); units record theirs in their markers.

    A folder made from other inputs or another config is replaced by the first shard of the new
    plan; the shards after it find the new plan and reuse it. ``--force`` never replaces a folder
    whose plan matches (that would delete the other shards' work): the stages redo their units.
    A corrupt manifest is an error, except with ``--force``, which rebuilds the artifact.
    ``folder`` overrides where the artifact lives (one round of the closed loop).
    Debris of killed writes (this artifact's own temporaries, beside it and inside it) older
    than ``SHARED_DEBRIS_MIN_AGE_S`` is swept: younger ones may belong to a running shard.
    """
    folder = layout.path(artifact) if folder is None else Path(folder)
    plan = build_manifest(
        layout,
        artifact,
        config,
        seeds=seeds,
        extra={**(extra or {}), "units": units},
        complete=False,
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    with creation_lock(folder):
        existing = read_manifest_or_none(folder, force=force)
        if existing is not None and existing.fingerprint == plan.fingerprint:
            # Other jobs may be writing their own temporaries here right now: only old debris.
            sweep_debris(folder, None, min_age_s=SHARED_DEBRIS_MIN_AGE_S)
            sweep_debris(UnitMarkers(folder).folder, None, min_age_s=SHARED_DEBRIS_MIN_AGE_S)
            return existing
        sweep_debris(folder.parent, [folder.name], min_age_s=SHARED_DEBRIS_MIN_AGE_S)
        tmp = _tmp_name(folder)
        tmp.mkdir()
        try:
            digests = build_skeleton(tmp)
            if digests:  # chunk digests of what the skeleton wrote (arrays no unit rewrites)
                plan = replace(plan, extra={**plan.extra, "digests": digests})
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
    """Mark the artifact complete if every unit is done. Safe to call from every shard.

    What units recorded in their markers is merged into the manifest, so readers can verify
    it: chunk digests (``digests``: array -> chunk -> digest, over any the skeleton recorded)
    and file digests (``files``: name relative to the artifact -> digest).
    """
    units = int(manifest.extra.get("units", 0))
    markers = UnitMarkers(folder)
    if markers.missing(units):
        return False
    infos = [markers.info(unit) for unit in range(units)]
    extra = dict(manifest.extra)
    digests: dict[str, dict[str, str]] = {k: dict(v) for k, v in extra.get("digests", {}).items()}
    files: dict[str, str] = dict(extra.get("files", {}))
    for info in infos:
        for name, chunks in info.get("digests", {}).items():
            digests.setdefault(name, {}).update(chunks)
        files.update(info.get("files", {}))
    if digests:
        extra["digests"] = digests
    if files:
        extra["files"] = dict(sorted(files.items()))
    complete = replace(manifest, complete=True, extra=extra)
    current = read_manifest_or_none(folder, force=True)
    if (
        current is not None
        and current.complete
        and current.fingerprint == manifest.fingerprint
        and current.extra == complete.extra
    ):
        return True
    write_manifest(folder, complete)
    return True


def verify_files(folder: Path, manifest: Manifest, pattern: str, rebuild: str) -> list[Path]:
    """The files of a finished artifact matching ``pattern`` (``fnmatch`` on paths relative to the
    artifact, so ``*`` also crosses folders), each checked against the digest its
    unit recorded: a missing, extra or altered file is an ``InputError`` naming it."""
    from grasp_cli.artifacts.manifest import file_digest
    from grasp_cli.errors import InputError

    recorded: dict[str, str] = manifest.extra.get("files", {})
    present = {
        relative: path
        for path in sorted(Path(folder).rglob("*"))
        if path.is_file()
        and not (relative := path.relative_to(folder).as_posix()).startswith(f"{BOOKKEEPING}/")
        and fnmatch.fnmatch(relative, pattern)
    }
    if not recorded:
        return list(present.values())  # an artifact made before digests were recorded
    expected = {name: d for name, d in recorded.items() if fnmatch.fnmatch(name, pattern)}
    for name in sorted(set(expected) - set(present)):
        raise InputError(f"{Path(folder) / name}: missing (its unit finished); {rebuild}")
    for name in sorted(set(present) - set(expected)):
        raise InputError(f"{present[name]}: not written by this artifact's units; {rebuild}")
    for name, digest in expected.items():
        if file_digest([present[name]]) != digest:
            raise InputError(
                f"{present[name]}: changed since it was written (digest mismatch); {rebuild}"
            )
    return [present[name] for name in sorted(expected)]
