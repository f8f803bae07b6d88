"""Plan subsets (``RUN/subsets.zarr``), train on each, and measure every task (``RUN/retrain/``).

A *job* is one (subset, seed) training run. Every subset is trained with the
same base seed (common random numbers: same initialization and data stream), and
``retrain.repeat_subsets`` of them again with other seeds to measure the noise
ceiling. Each job writes ``part-JJJJJJ.parquet`` atomically, then its marker, so
a rerun skips finished jobs and never duplicates rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import zarr
from tqdm import tqdm

from grasp_cli.artifacts.examples import Corpus, open_corpus, read_tasks
from grasp_cli.artifacts.manifest import file_digest, require
from grasp_cli.artifacts.sharded import finish_if_complete, open_sharded
from grasp_cli.artifacts.shards import UnitMarkers, owned_units
from grasp_cli.artifacts.tables import read_table, write_table
from grasp_cli.artifacts.zarr_io import CheckedGroup, chunk_digests, open_group_read
from grasp_cli.context import StageContext
from grasp_cli.errors import InputError
from grasp_cli.reference import data_shape_of, ensure_reference, new_bundle

RESULT_COLUMNS = ["subset_id", "role", "task", "metric", "value", "seed", "steps", "wall_s"]


@dataclass(frozen=True)
class Job:
    subset_id: int
    seed: int
    label: str  # the role ("fit"/"eval"/...) or the selection's name


def base_seed(ctx: StageContext) -> int:
    return ctx.config.derived_seed(ctx.config.retrain.seed, "retrain")


def subsets_seed(ctx: StageContext) -> int:
    return ctx.config.derived_seed(ctx.config.subsets.seed, "subsets")


def plan_jobs(roles: list[str], repeat_subsets: int, repeat_seeds: int, seed: int) -> list[Job]:
    """Every subset once with the base seed, then ``repeat_subsets`` subsets (spread over the ids)
    again with ``repeat_seeds`` extra seeds each."""
    jobs = [Job(sid, seed, role) for sid, role in enumerate(roles)]
    count = min(repeat_subsets, len(roles))
    if count:
        picked = np.unique(np.linspace(0, len(roles) - 1, count).round().astype(int))
        for extra in range(1, repeat_seeds + 1):
            jobs += [Job(int(sid), seed + extra, roles[sid]) for sid in picked]
    return jobs


def ensure_subsets(ctx: StageContext, corpus: Corpus) -> CheckedGroup:
    """Build ``RUN/subsets.zarr`` from the [subsets] design (deterministic, so every shard agrees)."""
    from grasp_cli.subsets.designs import plan_subsets

    section = ctx.config.subsets
    codes, names = corpus.domain_codes()
    given = None
    if "given" in section.designs:
        if not section.given:
            raise InputError("subsets.designs has 'given' but subsets.given names no file")
        given = read_table(Path(section.given))
    plan = plan_subsets(
        section,
        corpus.ids,
        codes,
        names,
        subsets_seed(ctx),
        given_table=given,
        given_path=section.given,
    )

    def skeleton(folder: Path) -> dict[str, dict[str, str]]:
        return write_subsets_group(folder, plan, len(corpus), names)

    manifest = open_sharded(
        ctx,
        "subsets",
        skeleton,
        units=0,
        seeds={"subsets": subsets_seed(ctx)},
        extra={"m": len(plan.sizes), "n": len(corpus)},
    )
    finish_if_complete(ctx.layout.subsets, manifest)
    return open_group_read(ctx.layout.subsets, "retrain-subsets")


def write_subsets_group(
    folder: Path, plan, n_rows: int, domain_names: list[str]
) -> dict[str, dict[str, str]]:
    """Write ``subsets.zarr``; returns the chunk digests of its arrays (for the manifest)."""
    group = zarr.open_group(str(folder), mode="w")
    membership = np.asarray(plan.membership, dtype=np.uint8)
    group.create_array(
        "membership",
        shape=membership.shape,
        chunks=(min(256, max(1, membership.shape[0])), membership.shape[1]),
        dtype="uint8",
    )[:] = membership
    group.create_array("size", shape=(len(plan.sizes),), dtype="int64")[:] = np.asarray(plan.sizes)
    for name, column in (("role", plan.roles), ("design", plan.design), ("params", plan.params)):
        values = np.array([str(v) for v in column])
        group.create_array(name, shape=(len(values),), dtype=str)[:] = values
    group.attrs.update(
        {"n": n_rows, "m": len(plan.sizes), "domains": domain_names, "bitorder": "big"}
    )
    return {name: chunk_digests(array) for name, array in group.arrays()}


def subset_rows(group: CheckedGroup, subset_id: int, n_rows: int) -> np.ndarray:
    """Corpus row indices of one subset, from its bit-packed membership."""
    bits = np.unpackbits(np.asarray(group["membership"][subset_id]), count=n_rows)
    return np.flatnonzero(bits)


def run_retrain(ctx: StageContext, limit: int | None = None) -> str:
    layout, config = ctx.layout, ctx.config
    require(layout, "corpus", config, force=ctx.force)
    require(layout, "tasks", config, force=ctx.force)
    corpus = open_corpus(layout.corpus)
    group = ensure_subsets(ctx, corpus)
    roles = [str(r) for r in group["role"][:]]
    jobs = plan_jobs(
        roles, config.retrain.repeat_subsets, config.retrain.repeat_seeds, base_seed(ctx)
    )
    rows_of = lambda job: subset_rows(group, job.subset_id, len(corpus))  # noqa: E731
    return train_jobs(ctx, "retrain", jobs, rows_of, corpus, limit)


def train_jobs(
    ctx: StageContext, artifact: str, jobs: list[Job], rows_of, corpus: Corpus, limit: int | None
) -> str:
    """Train every owned, unfinished job; write one Parquet part per job; finish the artifact."""
    ctx.apply_threads()
    layout, config = ctx.layout, ctx.config
    tasks = read_tasks(layout.tasks)
    bundle = new_bundle(ctx, data_shape_of(corpus))
    init_state = (
        ensure_reference(ctx, corpus, bundle) if config.retrain.init == "reference" else None
    )
    manifest = open_sharded(
        ctx,
        artifact,
        lambda folder: None,
        units=len(jobs),
        seeds={"retrain": base_seed(ctx)},
        extra={"jobs": len(jobs)},
    )
    folder = layout.path(artifact)
    markers = UnitMarkers(folder)
    todo = [u for u in owned_units(len(jobs), ctx.shard) if ctx.force or not markers.is_done(u)]
    if limit is not None:
        todo = todo[: max(0, limit)]

    from grasp_cli.train import TrainRecipe, evaluate_tasks, train, train_many

    recipe = TrainRecipe.from_section(config.retrain)
    data = corpus.to_torch()  # a row store: each step reads its batch's rows only
    task_data = {name: examples.to_torch() for name, examples in tasks.items()}
    width = max(1, config.retrain.parallel_models)
    bar = tqdm(
        total=len(todo), unit="run", desc=f"{artifact} {ctx.shard}", disable=not ctx.progress
    )
    started = time.perf_counter()
    for first in range(0, len(todo), width):
        group_units = todo[first : first + width]
        group_jobs = [jobs[u] for u in group_units]
        indices = [rows_of(job) for job in group_jobs]
        for job, rows in zip(group_jobs, indices, strict=True):
            if len(rows) == 0:
                raise InputError(f"subset {job.subset_id} is empty; check the [subsets] design")
        t0 = time.perf_counter()
        if len(group_jobs) == 1:
            results = [
                train(
                    bundle,
                    data,
                    indices[0],
                    recipe,
                    group_jobs[0].seed,
                    init_state=init_state,
                    device=ctx.device,
                )
            ]
        else:
            results = train_many(
                bundle,
                data,
                indices,
                recipe,
                [j.seed for j in group_jobs],
                init_state=init_state,
                device=ctx.device,
            )
        wall = (time.perf_counter() - t0) / len(group_jobs)
        for unit, job, result in zip(group_units, group_jobs, results, strict=True):
            metrics = evaluate_tasks(
                bundle,
                result.state_dict,
                task_data,
                config.retrain.eval_batch_size,
                device=ctx.device,
            )
            part = folder / f"part-{unit:06d}.parquet"
            write_table(part, _result_table(job, metrics, recipe.steps, wall))
            markers.mark_done(
                unit, subset_id=job.subset_id, seed=job.seed, files={part.name: file_digest([part])}
            )
        bar.update(len(group_jobs))
    bar.close()
    elapsed = time.perf_counter() - started
    complete = finish_if_complete(folder, manifest)
    left = len(markers.missing(len(jobs)))
    rate = (
        f"{len(todo) / elapsed * 3600:.0f} runs/hour" if todo and elapsed > 0 else "nothing to do"
    )
    return f"{artifact}: trained {len(todo)} runs in {elapsed:.1f}s ({rate}); " + (
        f"{folder} complete" if complete else f"{left} of {len(jobs)} runs left"
    )


def _result_table(
    job: Job, metrics: dict[str, dict[str, float]], steps: int, wall_s: float
) -> pa.Table:
    rows = [
        {
            "subset_id": job.subset_id,
            "role": job.label,
            "task": task,
            "metric": metric,
            "value": float(value),
            "seed": job.seed,
            "steps": steps,
            "wall_s": wall_s,
        }
        for task, values in sorted(metrics.items())
        for metric, value in sorted(values.items())
    ]
    return pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [
                ("subset_id", pa.int64()),
                ("role", pa.string()),
                ("task", pa.string()),
                ("metric", pa.string()),
                ("value", pa.float64()),
                ("seed", pa.int64()),
                ("steps", pa.int64()),
                ("wall_s", pa.float64()),
            ]
        ),
    )


def read_results(folder: Path) -> pa.Table:
    """All parts of a finished retrain (or curation) artifact as one table.

    Each part is checked against the digest its job recorded: a deleted, foreign or altered
    part is an error naming it, never a silently smaller table.
    """
    from grasp_cli.artifacts.manifest import read_manifest
    from grasp_cli.artifacts.sharded import verify_files

    manifest = read_manifest(folder)
    stage = "retrain-subsets --curation" if Path(folder).name == "curation" else "retrain-subsets"
    if manifest is not None and manifest.complete:
        parts = verify_files(folder, manifest, "part-*.parquet", f"rerun `grasp {stage} --force`")
    else:
        parts = sorted(Path(folder).glob("part-*.parquet"))
    if not parts:
        raise InputError(f"{folder}: no results; run `grasp {stage}` first")
    return pa.concat_tables([read_table(p) for p in parts])


def run_curation(ctx: StageContext, limit: int | None = None) -> str:
    """Train on each selection of ``RUN/selection/curation.parquet`` (GRASP, random, additive top-B)."""
    layout, config = ctx.layout, ctx.config
    require(layout, "selection", config, force=ctx.force)
    corpus = open_corpus(layout.corpus)
    table = read_table(layout.selection / "curation.parquet")
    selections = np.array(table.column("selection").to_pylist(), dtype=object)
    names = sorted(set(selections.tolist()))
    rows, known = corpus.positions(table.column("id").to_numpy())
    if not known.all():
        raise InputError(
            f"{layout.selection / 'curation.parquet'}: ids not in {layout.corpus}; rerun `grasp select`"
        )
    members = {name: rows[selections == name].tolist() for name in names}
    seeds = [base_seed(ctx) + extra for extra in range(1 + config.retrain.repeat_seeds)]
    jobs = [Job(index, seed, name) for seed in seeds for index, name in enumerate(names)]
    rows_of = lambda job: np.sort(np.array(members[job.label]))  # noqa: E731
    return train_jobs(ctx, "curation", jobs, rows_of, corpus, limit)
