"""`grasp status`: what exists in a run, what is stale, which units are missing."""

from __future__ import annotations

from grasp_cli.artifacts.layout import ARTIFACTS
from grasp_cli.artifacts.manifest import read_manifest, staleness
from grasp_cli.artifacts.shards import UnitMarkers
from grasp_cli.context import StageContext


def run_status(ctx: StageContext) -> str:
    lines = [f"run: {ctx.layout.root}"]
    for name, (stage, _, _) in ARTIFACTS.items():
        folder = ctx.layout.path(name)
        manifest = read_manifest(folder)
        if manifest is None:
            state = "missing" if not folder.exists() else "incomplete (no manifest)"
        elif not manifest.complete:
            units = int(manifest.extra.get("units", 0))
            missing = UnitMarkers(folder).missing(units) if units else []
            shown = ", ".join(map(str, missing[:12])) + (" ..." if len(missing) > 12 else "")
            state = f"incomplete: {len(missing)}/{units} units missing [{shown}]"
        else:
            reason = staleness(ctx.layout, name, ctx.config)
            state = f"STALE: {reason}" if reason else f"ok ({manifest.created})"
        lines.append(f"  {name:<10} {state:<60} <- grasp {stage}")
    return "\n".join(lines)
