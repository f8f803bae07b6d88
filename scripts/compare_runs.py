"""Compare two run directories artifact by artifact: are their contents identical?

    python scripts/compare_runs.py RUN_A RUN_B [--artifacts corpus,tasks,...]

Arrays (Zarr) are compared bit for bit; Parquet tables as sorted rows (``wall_s`` and other
timing columns left out); JSON parameters as parsed values. Prints one line per artifact
(``same`` / ``DIFFERENT: ...``) and exits 1 if anything differs. Used to check that a
behaviour-preserving refactor really preserved the demo's outputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import zarr

TIMING = {"wall_s", "created"}


def _tables(folder: Path) -> dict[str, list[tuple]]:
    out = {}
    for path in sorted(folder.rglob("*.parquet")):
        table = pq.read_table(path)
        keep = [c for c in table.column_names if c not in TIMING]
        rows = list(zip(*(table.column(c).to_pylist() for c in keep), strict=True))
        out[path.relative_to(folder).as_posix()] = (keep, sorted(rows, key=repr))
    return out


def _arrays(folder: Path) -> dict[str, bytes]:
    group = zarr.open_group(str(folder), mode="r")
    return {name: np.asarray(array[:]).tobytes() for name, array in group.arrays()}


def _json(folder: Path) -> dict[str, object]:
    return {
        p.relative_to(folder).as_posix(): json.loads(p.read_text())
        for p in sorted(folder.glob("*.json"))
        if not p.name.startswith(("manifest", "_"))
    }


def _npz(folder: Path) -> dict[str, bytes]:
    out = {}
    for path in sorted(folder.glob("*.npz")):
        with np.load(path, allow_pickle=False) as data:
            for key in data.files:
                out[f"{path.name}:{key}"] = data[key].tobytes()
    return out


def compare(a: Path, b: Path, name: str) -> str:
    fa, fb = a / name, b / name
    if not fa.exists() or not fb.exists():
        return "missing in " + (
            "both"
            if not fa.exists() and not fb.exists()
            else (str(a) if not fa.exists() else str(b))
        )
    problems = []
    if name.endswith(".zarr"):
        x, y = _arrays(fa), _arrays(fb)
        problems += [f"array {k}" for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
    else:
        for reader, what in ((_tables, "table"), (_json, "json"), (_npz, "npz")):
            x, y = reader(fa), reader(fb)
            problems += [f"{what} {k}" for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
        if name == "reference":
            if (fa / "model.pt").read_bytes() != (fb / "model.pt").read_bytes():
                problems.append("model.pt")
    return "same" if not problems else "DIFFERENT: " + ", ".join(problems[:6])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument(
        "--artifacts",
        default="corpus,tasks,reference,sketches.zarr,subsets.zarr,retrain,surrogate,scores,selection,curation",
    )
    args = parser.parse_args()
    bad = False
    for name in args.artifacts.split(","):
        verdict = compare(args.a, args.b, name)
        bad |= verdict != "same"
        print(f"{name:<14} {verdict}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
