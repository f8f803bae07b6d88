"""``grasp select --export DIR``: the selected corpus rows as Parquet shards in a folder of their own.

An export never destroys anything that is not an earlier export. The target may be:

- a folder that does not exist yet, or an empty one: it is created;
- an earlier grasp export that grasp wrote entirely (its ``_grasp_export.json`` lists every
  other file in it): it is replaced atomically;
- any other folder: refused (exit 2) unless ``--force``, and even then nothing in it is
  deleted or overwritten: the export's files are added beside the user's, and a name that
  is already taken is refused.

The run directory, any folder holding it, and grasp's own artifact folders are never
export targets, whatever the flags; neither is an existing file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

from grasp_cli.artifacts.atomic import atomic_dir, atomic_write_text, writing
from grasp_cli.artifacts.examples import Examples, write_examples_stream
from grasp_cli.artifacts.layout import ARTIFACTS, RunLayout
from grasp_cli.errors import UsageError

EXPORT_MARKER = "_grasp_export.json"


def export_mode(target: Path, layout: RunLayout, force: bool) -> str:
    """How ``target`` may receive an export: 'create', 'replace' (an empty folder or an earlier
    export) or 'add' (a user's folder, with ``force``). Raises UsageError otherwise."""
    target = Path(target)
    resolved, run = target.resolve(), layout.root.resolve()
    if resolved == run or run.is_relative_to(resolved):
        raise UsageError(
            f"--export {target}: that folder holds the run {layout.root}; choose another"
        )
    for name in ARTIFACTS:
        folder = layout.path(name).resolve()
        if resolved == folder or resolved.is_relative_to(folder):
            raise UsageError(
                f"--export {target}: that is inside grasp's {name} artifact; choose another folder"
            )
    if not target.exists() and not target.is_symlink():
        return "create"
    if not target.is_dir():
        raise UsageError(f"--export {target}: exists and is not a folder; choose another path")
    entries = sorted(p.name for p in target.iterdir())
    if not entries or _holds_only_an_export(target, entries):
        return "replace"
    if not force:
        raise UsageError(
            f"--export {target}: exists and is not a grasp export ({len(entries)} entries, e.g. "
            f"{entries[0]!r}); choose a new folder, or pass --force to add the export's files "
            "to it without deleting anything"
        )
    return "add"


def _holds_only_an_export(target: Path, entries: list[str]) -> bool:
    """A folder is an earlier export (safe to replace) only if grasp wrote all of it: its marker
    says it owned the folder and lists every other entry as one of its part files."""
    try:
        marker = json.loads((target / EXPORT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("mode") == "add":
        return False
    files = set(marker.get("files", []))
    return all(name == EXPORT_MARKER or name in files for name in entries)


def write_export(
    target: Path,
    layout: RunLayout,
    examples: tuple[int, Iterable[Examples]],
    *,
    force: bool,
    shard_rows: int,
    row_group_rows: int,
    provenance: dict,
) -> str:
    """Write ``examples`` (row count, blocks of rows) to ``target`` as ``part-NNNNN.parquet`` +
    ``_grasp_export.json``, streamed: never more than a block and a row group in memory."""
    mode = export_mode(target, layout, force)
    count, blocks = examples
    parts = -(-max(count, 1) // shard_rows)
    names = [f"part-{i:05d}.parquet" for i in range(parts)]
    marker = {
        "kind": "grasp export",
        "mode": mode,
        "files": names,
        "rows": count,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **provenance,
    }
    if mode in ("create", "replace"):
        with atomic_dir(target) as folder:
            write_examples_stream(folder, blocks, shard_rows, row_group_rows)
            (folder / EXPORT_MARKER).write_text(json.dumps(marker, indent=2, default=str))
        return mode
    # "add": every name this export writes must be free; nothing is replaced.
    taken = [name for name in [*names, EXPORT_MARKER] if (target / name).exists()]
    if taken:
        raise UsageError(
            f"--export {target}: {target / taken[0]} already exists; grasp never overwrites a "
            "file it did not write: choose a new folder"
        )
    with writing(target):
        write_examples_stream(target, blocks, shard_rows, row_group_rows)
    atomic_write_text(target / EXPORT_MARKER, json.dumps(marker, indent=2, default=str))
    return mode
