"""`grasp status`: what exists in a run, what is stale or damaged, which units are missing.

Each artifact is checked on its own, so one damaged manifest never hides the rest of the run:

- ``missing`` / ``incomplete`` (units left, listed) / ``STALE`` (made from older inputs or
  another config) / ``DAMAGED`` / ``ok``;
- damage is found by re-checking what the writers recorded: the content digest of artifacts
  written whole (corpus, tasks, reference, surrogate, selection, report), every Zarr chunk's
  digest (sketches, subsets) and every part file's digest (retrain, curation, scores), plus
  the corpus/tasks pair id. This reads the artifacts' bytes once, streaming.

``--json`` prints the same as one JSON document; ``--check`` exits 1 unless every artifact is
``ok`` (missing, incomplete, stale or damaged), so scripts can gate on it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

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


@dataclass(frozen=True)
class ArtifactState:
    """One artifact's state: ``state`` is one of ``STATES``; ``detail`` says why or when."""

    name: str
    stage: str
    state: str
    detail: str
    missing_units: tuple[int, ...] = ()

    def text(self) -> str:
        if self.state == "ok":
            return f"ok ({self.detail})"
        if self.state == "missing":
            return "missing"
        label = self.state.upper() if self.state in ("stale", "damaged") else self.state
        return f"{label}: {self.detail}"


STATES = ("ok", "missing", "incomplete", "stale", "damaged")


def artifact_state(ctx: StageContext, name: str) -> ArtifactState:
    folder = ctx.layout.path(name)
    stage = ARTIFACTS[name][0]

    def state(kind: str, detail: str, units: tuple[int, ...] = ()) -> ArtifactState:
        return ArtifactState(name, stage, kind, detail, units)

    try:
        manifest = read_manifest(folder)
    except GraspError as exc:
        return state("damaged", str(exc))
    if manifest is None:
        if folder.exists():
            return state("incomplete", "no manifest: interrupted before its first unit finished")
        return state("missing", "")
    if not manifest.complete:
        units = int(manifest.extra.get("units", 0))
        missing = UnitMarkers(folder).missing(units) if units else []
        shown = ", ".join(map(str, missing[:12])) + (" ..." if len(missing) > 12 else "")
        return state(
            "incomplete", f"{len(missing)}/{units} units missing [{shown}]", tuple(missing)
        )
    try:
        reason = staleness(ctx.layout, name, ctx.config)
    except GraspError as exc:  # an upstream manifest is damaged
        return state("stale", f"cannot check an input: {exc}")
    if reason:
        return state("stale", reason)
    problem = damage(ctx, name, manifest)
    if problem:
        return state("damaged", problem)
    return state("ok", manifest.created)


OPTIONAL = {"loop"}  # shown only when the run has one (the closed loop is a choice)


def run_states(ctx: StageContext) -> list[ArtifactState]:
    """Every artifact's state, in pipeline order (the optional loop only when it exists)."""
    return [
        artifact_state(ctx, name)
        for name in ARTIFACTS
        if name not in OPTIONAL or ctx.layout.path(name).exists()
    ]


def run_status(ctx: StageContext, check: bool = False, json_out: bool = False) -> tuple[str, int]:
    """The run's state as lines (or JSON with ``json_out``). With ``check`` the exit code is 1
    unless every artifact is ``ok`` (for scripts: ``grasp status --check && grasp report``)."""
    states = run_states(ctx)
    code = 1 if check and any(s.state != "ok" for s in states) else 0
    if json_out:
        document = {
            "run": str(ctx.layout.root),
            "complete": all(s.state == "ok" for s in states),
            "artifacts": {
                s.name: {
                    "state": s.state,
                    "detail": s.detail,
                    "stage": s.stage,
                    "path": str(ctx.layout.path(s.name)),
                    "missing_units": list(s.missing_units),
                }
                for s in states
            },
        }
        return json.dumps(document, indent=2), code
    lines = [f"run: {ctx.layout.root}"]
    for s in states:
        lines.append(f"  {s.name:<10} {s.text():<60} <- grasp {s.stage}")
    return "\n".join(lines), code
