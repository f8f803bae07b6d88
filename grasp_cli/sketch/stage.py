"""`grasp sketch`: θ0, then φ_i for every corpus row and r_t for every task -> RUN/sketches.zarr.

Layout of the Zarr group: ``train`` [N, k] (chunks of ``chunk_rows`` rows),
``train_ids`` [N] int64, ``tasks`` [T, k] float32, ``task_names`` [T] str.
Work units are the row chunks plus one unit for the task residuals; each shard
writes whole chunks and marks them done only after they are written.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm import tqdm

from grasp_cli.artifacts.examples import open_corpus, read_tasks
from grasp_cli.artifacts.manifest import require
from grasp_cli.artifacts.sharded import finish_if_complete, open_sharded
from grasp_cli.artifacts.shards import UnitMarkers, owned_units
from grasp_cli.artifacts.zarr_io import (
    CheckedGroup,
    chunk_digests,
    open_group_read,
    row_chunk_digests,
)
from grasp_cli.context import StageContext
from grasp_cli.reference import data_shape_of, ensure_reference, new_bundle


def sketch_seed(ctx: StageContext) -> int:
    return ctx.config.derived_seed(ctx.config.sketch.seed, "sketch")


def run_sketch(ctx: StageContext) -> str:
    ctx.apply_threads()
    config, layout = ctx.config, ctx.layout
    require(layout, "corpus", config, force=ctx.force)
    require(layout, "tasks", config, force=ctx.force)
    corpus = open_corpus(layout.corpus)  # footers and ids only; rows are read by block
    bundle = new_bundle(ctx, data_shape_of(corpus))
    state = ensure_reference(ctx, corpus, bundle, rebuild=ctx.force)
    bundle.module.load_state_dict(state)
    bundle.module.to(ctx.device)

    from grasp_cli.sketch.sketcher import Sketcher

    sketcher = Sketcher(bundle, config.sketch, sketch_seed(ctx), device=ctx.device)
    tasks = read_tasks(layout.tasks)
    n_rows, k = len(corpus), sketcher.k
    chunk = config.sketch.chunk_rows
    n_chunks = -(-n_rows // chunk)
    dtype = config.sketch.dtype
    task_names = sorted(tasks)

    def skeleton(folder: Path) -> dict[str, dict[str, str]]:
        group = zarr.open_group(str(folder), mode="w")
        # no compressor: gradient sketches are noise to zstd (~7 % smaller), and every pass of
        # fit-surrogate, score and select decodes them (about 1.5x faster reads uncompressed)
        group.create_array(
            "train",
            shape=(n_rows, k),
            chunks=(chunk, k),
            dtype=dtype,
            fill_value=0,
            compressors=None,
        )
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

    manifest = open_sharded(
        ctx,
        "sketches",
        skeleton,
        units=n_chunks + 1,
        seeds={"sketch": sketch_seed(ctx)},
        extra={"n": n_rows, "k": k, "chunk_rows": chunk, "task_names": task_names},
    )
    folder = layout.sketches
    markers = UnitMarkers(folder)
    group = zarr.open_group(str(folder), mode="r+")
    todo = [u for u in owned_units(n_chunks + 1, ctx.shard) if ctx.force or not markers.is_done(u)]
    started, done_rows = time.perf_counter(), 0
    bar = tqdm(
        total=sum(_unit_rows(u, n_rows, chunk) for u in todo),
        unit="ex",
        desc=f"sketch {ctx.shard}",
        disable=not ctx.progress,
        smoothing=0.1,
    )
    for unit in todo:
        if unit == n_chunks:  # the task residuals
            residuals = np.stack(
                [
                    sketcher.task_residual(
                        _task_batches(tasks[name], config.sketch.task_batch_size)
                    )
                    for name in task_names
                ]
            )
            group["tasks"][:] = residuals.astype(np.float32)
            digests = {"tasks": chunk_digests(group["tasks"])}
        else:
            start, stop = unit * chunk, min((unit + 1) * chunk, n_rows)
            rows, ids = [], []
            for _, block in corpus.iter_blocks(start, stop, config.sketch.batch_size):
                rows.append(sketcher.sketch_batch(_to_device(block.to_torch(), ctx.device)))
                ids.append(block.ids)
                bar.update(len(block))
            sketch = np.concatenate(rows)
            if not np.isfinite(sketch).all():
                bad = start + int(np.argwhere(~np.isfinite(sketch))[0, 0])
                raise FloatingPointError(
                    f"non-finite gradient sketch at corpus row {bad}; check θ0 and the data"
                )
            group["train"][start:stop] = sketch.astype(dtype)
            group["train_ids"][start:stop] = np.concatenate(ids)
            digests = {
                "train": row_chunk_digests(group["train"], start, stop),
                "train_ids": row_chunk_digests(group["train_ids"], start, stop),
            }
            done_rows += stop - start
        markers.mark_done(unit, digests=digests)
    bar.close()
    elapsed = time.perf_counter() - started
    complete = finish_if_complete(folder, manifest)
    rate = f"{done_rows / elapsed:.0f} ex/s" if done_rows and elapsed > 0 else "nothing to do"
    state_text = (
        "complete"
        if complete
        else f"{len(markers.missing(n_chunks + 1))} units left for other shards"
    )
    return f"sketch: {done_rows} rows in {elapsed:.1f}s ({rate}), k={k}, {config.sketch.projection}; {folder} {state_text}"


def _unit_rows(unit: int, n_rows: int, chunk: int) -> int:
    return max(0, min((unit + 1) * chunk, n_rows) - unit * chunk) if unit * chunk < n_rows else 0


def _to_device(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _task_batches(task, batch_size: int):
    data = task.to_torch()
    for start in range(0, len(task), batch_size):
        yield {k: v[start : start + batch_size] for k, v in data.items()}


def read_sketches(path: Path) -> CheckedGroup:
    """``sketches.zarr`` for reading; a damaged chunk or metadata file is an InputError naming it."""
    return open_group_read(path, "sketch")
