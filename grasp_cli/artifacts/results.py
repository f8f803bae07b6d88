"""Training results on disk: ``RUN/retrain/part-JJJJJJ.parquet`` and ``RUN/curation/part-*.parquet``.

One part per job (a subset or selection trained with one seed), rows of
``subset_id, role, task, metric, value, utility, seed, steps, wall_s``: ``metric`` is ``loss``
(mean per-example task loss, nats per token for language models) or ``accuracy`` (classifiers,
a fraction), ``value`` its measured value, ``utility`` the same measurement on the scale the
surrogate predicts (higher is better: ``−value`` for a loss, ``value`` for an accuracy),
``role`` the subset's role (fit | eval | given) or the curation selection's name. Readers get
every part verified against the digest its job recorded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from grasp_cli.artifacts.manifest import read_manifest
from grasp_cli.artifacts.sharded import verify_files
from grasp_cli.artifacts.tables import read_table
from grasp_cli.errors import InputError

RESULT_SCHEMA = pa.schema(
    [
        ("subset_id", pa.int64()),
        ("role", pa.string()),
        ("task", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
        ("utility", pa.float64()),
        ("seed", pa.int64()),
        ("steps", pa.int64()),
        ("wall_s", pa.float64()),
    ]
)


def result_table(
    subset_id: int,
    role: str,
    seed: int,
    steps: int,
    wall_s: float,
    metrics: dict[str, dict[str, float]],
) -> pa.Table:
    """One job's rows: every (task, metric) of ``metrics`` (task -> metric -> value), sorted."""
    rows = [
        {
            "subset_id": subset_id,
            "role": role,
            "task": task,
            "metric": metric,
            "value": float(value),
            "utility": utility_of(metric, float(value)),
            "seed": seed,
            "steps": steps,
            "wall_s": wall_s,
        }
        for task, values in sorted(metrics.items())
        for metric, value in sorted(values.items())
    ]
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def utility_of(metric: str, value: float) -> float:
    """A measurement on the utility scale (higher is better): −loss, or the accuracy as it is."""
    return -value if metric == "loss" else value


def read_results(folder: Path) -> pa.Table:
    """All parts of a finished retrain (or curation) artifact as one table.

    Each part is checked against the digest its job recorded: a deleted, foreign or altered
    part is an error naming it, never a silently smaller table.
    """
    manifest = read_manifest(folder)
    stage = "retrain-subsets --curation" if Path(folder).name == "curation" else "retrain-subsets"
    if manifest is not None and manifest.complete:
        parts = verify_files(folder, manifest, "part-*.parquet", f"rerun `grasp {stage} --force`")
    else:
        parts = sorted(Path(folder).glob("part-*.parquet"))
    if not parts:
        raise InputError(f"{folder}: no results; run `grasp {stage}` first")
    return pa.concat_tables([read_table(p) for p in parts])


def utilities(
    results: pa.Table, task_names: list[str], n_subsets: int, seed: int, metric: str = "loss"
) -> np.ndarray:
    """``U`` ``[M, T]``: each subset's ``utility`` for ``metric`` in its run with ``seed`` (NaN
    where absent); for the default ``loss`` that is −loss."""
    values = np.full((n_subsets, len(task_names)), np.nan)
    column = {name: t for t, name in enumerate(task_names)}
    for row in results.to_pylist():
        if row["metric"] == metric and row["seed"] == seed and row["task"] in column:
            values[row["subset_id"], column[row["task"]]] = row["utility"]
    return values
