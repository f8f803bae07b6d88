"""`grasp status`: what exists in a run, what is stale or damaged, which units are missing.

Each artifact is checked on its own, so one damaged manifest never hides the rest of the run:

- ``missing`` / ``incomplete`` (units left, listed) / ``STALE`` (made from older inputs or
  another config) / ``DAMAGED`` / ``ok``;
- damage is found by re-checking what the writers recorded: the content digest of artifacts
  written whole (corpus, tasks, reference, surrogate, selection, report), every Zarr chunk's
  digest (sketches, subsets) and every part file's digest (retrain, curation, scores), plus
  the corpus/tasks pair id. This reads the artifacts' bytes once, streaming.
"""

from __future__ import annotations

from grasp_cli.artifacts.layout import ARTIFACTS
from grasp_cli.artifacts.manifest import (
    Manifest,
    check_prepared_pair,
    folder_digest,
    read_manifest,
    staleness,
)
from grasp_cli.artifacts.shards import UnitMarkers
from grasp_cli.context import StageContext
from grasp_cli.errors import GraspError

ZARR_ARTIFACTS = {"sketches": "sketch", "subsets": "retrain-subsets"}
PART_ARTIFACTS = {
    "retrain": "part-*.parquet",
    "curation": "part-*.parquet",
    "scores": "*.parquet",
}


def damage(ctx: StageContext, name: str, manifest: Manifest) -> str | None:
    """Why a complete artifact's bytes differ from what was written (None when intact)."""
    from grasp_cli.artifacts.sharded import verify_files
    from grasp_cli.artifacts.zarr_io import open_group_read

    folder = ctx.layout.path(name)
    try:
        if name in ("corpus", "tasks"):
            check_prepared_pair(ctx.layout)
        if name in ZARR_ARTIFACTS:
            open_group_read(folder, ZARR_ARTIFACTS[name]).verify_all()
        elif name in PART_ARTIFACTS:
            verify_files(folder, manifest, PART_ARTIFACTS[name], "rerun its stage with --force")
        elif name == "loop":  # every finished round's result parts
            from grasp_cli.artifacts.manifest import read_manifest as read
            from grasp_cli.retrain.loop import finished_rounds, round_folder

            for number in finished_rounds(folder):
                part_folder = round_folder(folder, number)
                verify_files(part_folder, read(part_folder), "part-*.parquet", "rerun the round")
        elif name == "reference":
            from grasp_cli.reference import reference_damage

            return reference_damage(folder, manifest)
        elif manifest.content and folder_digest(folder) != manifest.content:
            return (
                f"its files changed since they were written; rerun `grasp {manifest.stage} --force`"
            )
    except GraspError as exc:
        return str(exc)
    return None


def artifact_state(ctx: StageContext, name: str) -> str:
    folder = ctx.layout.path(name)
    try:
        manifest = read_manifest(folder)
    except GraspError as exc:
        return f"DAMAGED: {exc}"
    if manifest is None:
        return "missing" if not folder.exists() else "incomplete (no manifest)"
    if not manifest.complete:
        units = int(manifest.extra.get("units", 0))
        missing = UnitMarkers(folder).missing(units) if units else []
        shown = ", ".join(map(str, missing[:12])) + (" ..." if len(missing) > 12 else "")
        return f"incomplete: {len(missing)}/{units} units missing [{shown}]"
    try:
        reason = staleness(ctx.layout, name, ctx.config)
    except GraspError as exc:  # an upstream manifest is damaged
        return f"STALE (cannot check an input: {exc})"
    if reason:
        return f"STALE: {reason}"
    problem = damage(ctx, name, manifest)
    if problem:
        return f"DAMAGED: {problem}"
    return f"ok ({manifest.created})"


OPTIONAL = {"loop"}  # shown only when the run has one (the closed loop is a choice)


def run_status(ctx: StageContext) -> str:
    lines = [f"run: {ctx.layout.root}"]
    for name, (stage, _, _) in ARTIFACTS.items():
        if name in OPTIONAL and not ctx.layout.path(name).exists():
            continue
        lines.append(f"  {name:<10} {artifact_state(ctx, name):<60} <- grasp {stage}")
    return "\n".join(lines)
