"""`grasp sketch`: θ0, then φ_i for every corpus row and r_t for every task -> RUN/sketches.zarr.

Read → compute → write. The work units are the row chunks of the sketch array (``sketch.
chunk_rows`` rows each, read from the corpus shards as a stream), one unit for the task
residuals and, when the authors' ``traker`` runs beside (``sketch.trak_ref``), one unit for
it; ``runner.run_units`` shards them, and each unit writes whole chunks, then records their
digests in its completion marker. With ``sketch.trak_k > 0`` the same units also compute
TRAK's features (``trak.py``): ``trak_train`` ψ_i, ``trak_q`` Q_i, ``trak_tasks`` ψ_t. The
arithmetic is in ``Sketcher`` and ``TrakFeaturizer``; the layout in ``artifacts/sketches.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zarr

from grasp_cli.artifacts.examples import (
    Examples,
    count_rows,
    iter_example_blocks,
    open_corpus,
    read_tasks,
)
from grasp_cli.artifacts.manifest import require
from grasp_cli.artifacts.zarr_io import chunk_digests, row_chunk_digests
from grasp_cli.context import StageContext
from grasp_cli.errors import ConfigError
from grasp_cli.reference import ensure_reference, new_bundle, stage_data_shape
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


def chunk_trak(featurizer, corpus: Path, start: int, stop: int, batch_size: int):
    """``(ψ [stop−start, k_t] float32, Q [stop−start] float32)`` for corpus rows ``[start, stop)``."""
    psi, q = [], []
    for _, block in iter_example_blocks(corpus, start, stop, batch_size):
        features, weights = featurizer.featurize(block.to_torch())
        psi.append(features)
        q.append(weights)
    psi_all = np.concatenate(psi)
    if not np.isfinite(psi_all).all():
        bad = start + int(np.argwhere(~np.isfinite(psi_all))[0, 0])
        raise FloatingPointError(f"non-finite TRAK feature at corpus row {bad}; check θ0")
    return psi_all, np.concatenate(q)


def trak_ref_enabled(section, bundle) -> bool:
    """Whether the traker package runs beside (``sketch.trak_ref``); 'on' without it is an error.

    traker takes per-example gradients with ``torch.func``; a model that only supports looped
    per-example gradients (Hugging Face models) gets no trak-ref ('on' is then an error)."""
    if section.trak_k <= 0 or section.trak_ref == "off":
        return False
    if bundle.per_example != "vmap":
        if section.trak_ref == "on":
            raise ConfigError(
                "sketch.trak_ref = 'on': traker needs torch.func per-example gradients, which "
                "this model does not support; set sketch.trak_ref = 'auto' or 'off'"
            )
        return False
    try:
        import trak  # noqa: F401
    except ImportError:
        if section.trak_ref == "on":
            from grasp_cli.anchors import missing

            raise missing("traker", "sketch.trak_ref = 'on'") from None
        return False
    return True


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
    corpus = open_corpus(layout.corpus)  # footers and ids only; rows are read by block
    tasks = read_tasks(layout.tasks)
    bundle = new_bundle(ctx, stage_data_shape(ctx, corpus, tasks))
    state = ensure_reference(ctx, corpus, bundle, rebuild=ctx.force)
    bundle.module.load_state_dict(state)
    bundle.module.to(ctx.device)

    from grasp_cli.sketch.sketcher import Sketcher, SketchSettings

    cache_bytes = config.sketch.projection_cache_mb << 20
    sketcher = Sketcher(
        bundle,
        SketchSettings.of(config.sketch),
        config.seed("sketch"),
        device=ctx.device,
        cache_bytes=cache_bytes,
    )
    trak_k = config.sketch.trak_k
    featurizer = None
    if trak_k > 0:
        from grasp_cli.sketch.trak import TrakFeaturizer

        featurizer = TrakFeaturizer(
            bundle,
            trak_k,
            config.seed("trak"),
            config.sketch.trak_params,
            device=ctx.device,
            cache_bytes=cache_bytes,
        )
    with_ref = trak_ref_enabled(config.sketch, bundle)
    n_rows, k = len(corpus), sketcher.k
    chunk = config.sketch.chunk_rows
    n_chunks = -(-n_rows // chunk)
    dtype = config.sketch.dtype
    task_names = sorted(tasks)
    task_unit, ref_unit = n_chunks, n_chunks + 1
    n_units = n_chunks + 1 + int(with_ref)
    ref_lambdas = [float(x) for x in config.sketch.trak_ref_lambdas]
    costs = unit_costs(
        n_rows,
        chunk,
        task_rows=sum(len(tasks[name]) for name in task_names),
        trak=featurizer is not None,
        trak_ref=with_ref,
    )

    def skeleton(folder: Path) -> dict[str, dict[str, str]]:
        group = zarr.open_group(str(folder), mode="w")
        group.create_array(
            "train",
            shape=(n_rows, k),
            chunks=(chunk, k),
            dtype=dtype,
            fill_value=0,
            # no compressor: gradient sketches are noise to zstd (~7 % smaller), and every pass
            # of fit-surrogate, score and select decodes them (about 1.5x faster uncompressed)
            compressors=None,
            dimension_names=["example", "dim"],
        )
        group.create_array(
            "train_ids",
            shape=(n_rows,),
            chunks=(chunk,),
            dtype="int64",
            fill_value=-1,
            dimension_names=["example"],
        )
        group.create_array(
            "tasks",
            shape=(len(task_names), k),
            chunks=(len(task_names), k),
            dtype="float32",
            dimension_names=["task", "dim"],
        )
        names = group.create_array(
            "task_names", shape=(len(task_names),), dtype=str, dimension_names=["task"]
        )
        names[:] = np.array(task_names)
        attrs = {"sketch": sketcher.describe(), "k": k, "n": n_rows, "dtype": dtype}
        if featurizer is not None:
            shape = (n_rows, trak_k)
            group.create_array(
                "trak_train",
                shape=shape,
                chunks=(chunk, trak_k),
                dtype="float32",
                fill_value=0,
                compressors=None,
                dimension_names=["example", "trak_dim"],
            )
            group.create_array(
                "trak_q",
                shape=(n_rows,),
                chunks=(chunk,),
                dtype="float32",
                fill_value=0,
                dimension_names=["example"],
            )
            group.create_array(
                "trak_tasks",
                shape=(len(task_names), trak_k),
                chunks=(len(task_names), trak_k),
                dimension_names=["task", "trak_dim"],
                dtype="float32",
            )
            attrs["trak"] = featurizer.describe()
        if with_ref:
            width = len(ref_lambdas) * len(task_names)  # column l·T + t: λ_l, task t
            group.create_array(
                "trak_ref_scores",
                shape=(n_rows, width),
                chunks=(chunk, width),
                dtype="float64",
                dimension_names=["example", "lambda_task"],
            )
            attrs["trak_ref"] = {"package": "traker", "k": trak_k, "rel_lambdas": ref_lambdas}
        group.attrs.update(attrs)
        return {"task_names": chunk_digests(names)}

    folder = layout.sketches

    def work(units: list[int]) -> list[dict]:
        (unit,) = units
        group = zarr.open_group(str(folder), mode="r+")
        if unit == ref_unit:
            return [
                {
                    "digests": {
                        "trak_ref_scores": trak_ref_scores(
                            ctx, group, bundle, state, task_names, ref_lambdas
                        )
                    }
                }
            ]
        if unit == task_unit:
            group["tasks"][:] = task_residuals(sketcher, tasks, config.sketch.task_batch_size)
            digests = {"tasks": chunk_digests(group["tasks"])}
            if featurizer is not None:
                group["trak_tasks"][:] = np.stack(
                    [
                        featurizer.task_direction(
                            _task_batches(tasks[name], config.sketch.task_batch_size)
                        )
                        for name in task_names
                    ]
                )
                digests["trak_tasks"] = chunk_digests(group["trak_tasks"])
            return [{"digests": digests}]
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
        if featurizer is not None:
            psi, q = chunk_trak(featurizer, layout.corpus, start, stop, config.sketch.batch_size)
            group["trak_train"][start:stop] = psi
            group["trak_q"][start:stop] = q
            digests["trak_train"] = row_chunk_digests(group["trak_train"], start, stop)
            digests["trak_q"] = row_chunk_digests(group["trak_q"], start, stop)
        return [{"digests": digests}]

    report = run_units(
        ctx,
        "sketches",
        n_units,
        work,
        skeleton=skeleton,
        seeds={"sketch": config.seed("sketch"), "trak": config.seed("trak")},
        extra={
            "n": n_rows,
            "k": k,
            "chunk_rows": chunk,
            "task_names": task_names,
            "trak_k": trak_k,
            "trak_ref": with_ref,
        },
        weight=lambda unit: _unit_rows(unit, n_rows, chunk),
        unit_name="rows",
        cost=costs.__getitem__,
    )
    done_rows = int(report.weight)
    return (
        f"sketch: {done_rows} rows in {report.elapsed_s:.1f}s "
        f"({report.rate('ex') if done_rows else 'nothing to do'}), k={k}, "
        f"{config.sketch.projection}; {report.state}"
    )


def trak_ref_scores(
    ctx: StageContext, group, bundle, state: dict, task_names: list[str], lambdas: list[float]
):
    """Run traker on θ0 over every corpus row and task (the ``trak-ref`` unit); returns digests."""
    from grasp_cli.anchors.trak_ref import trak_reference

    config, layout = ctx.config, ctx.layout
    n_rows = count_rows(layout.corpus)
    batch = config.sketch.batch_size
    tasks = read_tasks(layout.tasks)
    result = trak_reference(
        bundle,
        state,
        (block.to_torch() for _, block in iter_example_blocks(layout.corpus, 0, n_rows, batch)),
        n_rows,
        {name: list(_task_batches(tasks[name], batch)) for name in task_names},
        k=config.sketch.trak_k,
        rel_lambdas=lambdas,
        seed=config.seed("trak-ref") % (2**31),
        device=ctx.device,
        scratch=layout.root,
        cache_bytes=config.sketch.projection_cache_mb << 20,
    )
    scores = result["scores"]  # [L, N, T]
    group["trak_ref_scores"][:] = scores.transpose(1, 0, 2).reshape(scores.shape[1], -1)
    return chunk_digests(group["trak_ref_scores"])


def unit_costs(n_rows: int, chunk: int, task_rows: int, trak: bool, trak_ref: bool) -> list[float]:
    """The gradient passes each sketch unit makes, for an even split over shards: a row chunk
    one per row (two with TRAK features: the loss and the model output), the task unit the same
    per task row, and the ``trak-ref`` unit (last, when on) one per corpus and task row."""
    passes = 1 + int(trak)
    n_chunks = -(-n_rows // chunk)
    costs = [float(passes * _unit_rows(u, n_rows, chunk)) for u in range(n_chunks)]
    costs.append(float(passes * task_rows))
    if trak_ref:
        costs.append(float(n_rows + task_rows))
    return costs


def _unit_rows(unit: int, n_rows: int, chunk: int) -> int:
    return max(0, min((unit + 1) * chunk, n_rows) - unit * chunk) if unit * chunk < n_rows else 0


def _to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _task_batches(task: Examples, batch_size: int) -> Iterator[dict]:
    data = task.to_torch()
    for start in range(0, len(task), batch_size):
        yield {k: v[start : start + batch_size] for k, v in data.items()}
