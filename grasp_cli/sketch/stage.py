"""`grasp sketch`: θ0, then φ_i for every corpus row and r_t for every task -> RUN/sketches.zarr.

Read → compute → write. The work units are the row chunks of the sketch array (``sketch.
chunk_rows`` rows each, read from the corpus shards as a stream) plus one unit for the task
residuals; ``runner.run_units`` shards them, and each unit writes whole chunks, then records
their digests in its completion marker. The arithmetic is in ``Sketcher`` (``sketcher.py``);
the on-disk layout in ``artifacts/sketches.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zarr

from grasp_cli.artifacts.examples import Examples, iter_example_blocks, read_examples, read_tasks
from grasp_cli.artifacts.manifest import require
from grasp_cli.artifacts.zarr_io import chunk_digests, row_chunk_digests
from grasp_cli.context import StageContext
from grasp_cli.reference import data_shape_of, ensure_reference, new_bundle
from grasp_cli.runner import run_units


def chunk_sketch(sketcher, corpus: Path, start: int, stop: int, batch_size: int, device: str):
    """``(φ [stop−start, k] float32, ids [stop−start])`` for corpus rows ``[start, stop)``, streamed."""
    rows, ids = [], []
    for _, block in iter_example_blocks(corpus, start, stop, batch_size):
        rows.append(sketcher.sketch_batch(_to_device(block.to_torch(), device)))
        ids.append(block.ids)
    sketch = np.concatenate(rows)
    if not np.isfinite(sketch).all():
        bad = start + int(np.argwhere(~np.isfinite(sketch))[0, 0])
        raise FloatingPointError(
            f"non-finite gradient sketch at corpus row {bad}; check θ0 and the data"
        )
    return sketch, np.concatenate(ids)


def task_residuals(sketcher, tasks: dict[str, Examples], batch_size: int) -> np.ndarray:
    """``r_t`` for every task, in sorted name order: float32 ``[T, k]``."""
    return np.stack(
        [sketcher.task_residual(_task_batches(tasks[name], batch_size)) for name in sorted(tasks)]
    ).astype(np.float32)


def run_sketch(ctx: StageContext) -> str:
    ctx.apply_threads()
    config, layout = ctx.config, ctx.layout
    require(layout, "corpus", config, force=ctx.force)
    require(layout, "tasks", config, force=ctx.force)
    corpus = read_examples(layout.corpus)
    bundle = new_bundle(ctx, data_shape_of(corpus))
    state = ensure_reference(ctx, corpus, bundle, rebuild=ctx.force)
    bundle.module.load_state_dict(state)
    bundle.module.to(ctx.device)

    from grasp_cli.sketch.sketcher import Sketcher, SketchSettings

    sketcher = Sketcher(
        bundle, SketchSettings.of(config.sketch), config.seed("sketch"), device=ctx.device
    )
    tasks = read_tasks(layout.tasks)
    n_rows, k = len(corpus), sketcher.k
    del corpus  # rows are streamed from the shards below; memory stays bounded
    chunk = config.sketch.chunk_rows
    n_chunks = -(-n_rows // chunk)
    dtype = config.sketch.dtype
    task_names = sorted(tasks)

    def skeleton(folder: Path) -> dict[str, dict[str, str]]:
        group = zarr.open_group(str(folder), mode="w")
        group.create_array("train", shape=(n_rows, k), chunks=(chunk, k), dtype=dtype, fill_value=0)
        group.create_array(
            "train_ids", shape=(n_rows,), chunks=(chunk,), dtype="int64", fill_value=-1
        )
        group.create_array(
            "tasks", shape=(len(task_names), k), chunks=(len(task_names), k), dtype="float32"
        )
        names = group.create_array("task_names", shape=(len(task_names),), dtype=str)
        names[:] = np.array(task_names)
        group.attrs.update({"sketch": sketcher.describe(), "k": k, "n": n_rows, "dtype": dtype})
        return {"task_names": chunk_digests(names)}

    folder = layout.sketches

    def work(units: list[int]) -> list[dict]:
        (unit,) = units
        group = zarr.open_group(str(folder), mode="r+")
        if unit == n_chunks:
            group["tasks"][:] = task_residuals(sketcher, tasks, config.sketch.task_batch_size)
            return [{"digests": {"tasks": chunk_digests(group["tasks"])}}]
        start, stop = unit * chunk, min((unit + 1) * chunk, n_rows)
        sketch, ids = chunk_sketch(
            sketcher, layout.corpus, start, stop, config.sketch.batch_size, ctx.device
        )
        group["train"][start:stop] = sketch.astype(dtype)
        group["train_ids"][start:stop] = ids
        digests = {
            "train": row_chunk_digests(group["train"], start, stop),
            "train_ids": row_chunk_digests(group["train_ids"], start, stop),
        }
        return [{"digests": digests}]

    report = run_units(
        ctx,
        "sketches",
        n_chunks + 1,
        work,
        skeleton=skeleton,
        seeds={"sketch": config.seed("sketch")},
        extra={"n": n_rows, "k": k, "chunk_rows": chunk, "task_names": task_names},
        weight=lambda unit: _unit_rows(unit, n_rows, chunk),
        unit_name="rows",
    )
    done_rows = int(report.weight)
    return (
        f"sketch: {done_rows} rows in {report.elapsed_s:.1f}s "
        f"({report.rate('ex') if done_rows else 'nothing to do'}), k={k}, "
        f"{config.sketch.projection}; {report.state}"
    )


def _unit_rows(unit: int, n_rows: int, chunk: int) -> int:
    return max(0, min((unit + 1) * chunk, n_rows) - unit * chunk) if unit * chunk < n_rows else 0


def _to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _task_batches(task: Examples, batch_size: int) -> Iterator[dict]:
    data = task.to_torch()
    for start in range(0, len(task), batch_size):
        yield {k: v[start : start + batch_size] for k, v in data.items()}
