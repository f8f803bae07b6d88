"""Plan subsets (``RUN/subsets.zarr``), train on each, and measure every task (``RUN/retrain/``).

A *job* is one (subset, seed) training run. Every subset is trained with the same base seed
(common random numbers: same initialization and data stream), and
``retrain.repeat_subsets`` of them again with other seeds to measure the noise ceiling. Jobs
are the units of ``runner.run_units``: each writes ``part-JJJJJJ.parquet`` atomically, then
its marker (with the part's digest), so a rerun skips finished jobs and never duplicates
rows. ``--limit M`` trains the first M unfinished jobs in an order that keeps every subset
design in proportion. ``--curation`` trains the selections of ``grasp select`` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from grasp_cli.artifacts.examples import Corpus, open_corpus, read_tasks
from grasp_cli.artifacts.manifest import file_digest, require
from grasp_cli.artifacts.results import result_table
from grasp_cli.artifacts.sharded import finish_if_complete, open_sharded
from grasp_cli.artifacts.subsets import Subsets, read_subsets, write_subsets
from grasp_cli.artifacts.tables import read_table, write_table
from grasp_cli.context import StageContext
from grasp_cli.errors import InputError
from grasp_cli.reference import ensure_reference, new_bundle, stage_data_shape
from grasp_cli.runner import run_units


@dataclass(frozen=True)
class Job:
    subset_id: int
    seed: int
    label: str  # the role ("fit"/"eval"/...) or the selection's name


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


def job_order(jobs: list[Job], design: np.ndarray) -> list[int]:
    """Units in the order ``--limit`` should take them: base-seed jobs in ``balanced_order``
    (any prefix holds every subset design in proportion), then the repeated-seed jobs."""
    from grasp_cli.subsets.designs import balanced_order

    rank = {int(s): r for r, s in enumerate(balanced_order(design))}
    return sorted(
        range(len(jobs)),
        key=lambda u: (jobs[u].seed != jobs[0].seed, rank.get(jobs[u].subset_id, 0), u),
    )


def ensure_subsets(ctx: StageContext, corpus: Corpus) -> Subsets:
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
        corpus.ids if "given" in section.designs else len(corpus),  # ids: only to map a file
        codes,
        names,
        ctx.config.seed("subsets"),
        given_table=given,
        given_path=section.given,
    )

    def skeleton(folder: Path) -> dict[str, dict[str, str]]:
        return write_subsets(
            folder, plan.membership, plan.sizes, plan.roles, plan.design, plan.params,
            len(corpus), names,
        )  # fmt: skip

    manifest = open_sharded(
        ctx.layout,
        ctx.config,
        "subsets",
        skeleton,
        units=0,
        force=ctx.force,
        seeds={"subsets": ctx.config.seed("subsets")},
        extra={"m": len(plan.sizes), "n": len(corpus)},
    )
    finish_if_complete(ctx.layout.subsets, manifest)
    return read_subsets(ctx.layout.subsets)


def run_retrain(
    ctx: StageContext, limit: int | None = None, curation: bool = False, loop: bool = False
) -> str:
    if curation and loop:
        raise InputError("retrain-subsets: give --curation or --loop, not both")
    if curation:
        return run_curation(ctx, limit)
    if loop:
        from grasp_cli.retrain.loop import run_loop

        return run_loop(ctx, limit)
    layout, config = ctx.layout, ctx.config
    require(layout, "corpus", config, force=ctx.force)
    require(layout, "tasks", config, force=ctx.force)
    corpus = open_corpus(layout.corpus)  # ids and domains as columns; rows from a row store
    subsets = ensure_subsets(ctx, corpus)
    jobs = plan_jobs(
        list(subsets.roles),
        config.retrain.repeat_subsets,
        config.retrain.repeat_seeds,
        ctx.config.seed("retrain"),
    )
    return train_jobs(
        ctx,
        "retrain",
        jobs,
        lambda job: subsets.rows(job.subset_id),
        corpus,
        limit,
        order=job_order(jobs, subsets.design),
    )


def train_jobs(
    ctx: StageContext,
    artifact: str,
    jobs: list[Job],
    rows_of: Callable[[Job], np.ndarray],
    corpus: Corpus,
    limit: int | None,
    order: list[int] | None = None,
    folder: Path | None = None,
    skeleton: Callable[[Path], dict | None] | None = None,
    extra: dict | None = None,
) -> str:
    """Train every owned, unfinished job; write one Parquet part per job; finish the artifact.

    Model, θ0 and data are set up only when this shard has a job to do. ``folder``,
    ``skeleton`` and ``extra``: where the artifact lives and what it holds besides the parts
    (a closed-loop round keeps its subsets there).
    """
    target = ctx.layout.path(artifact) if folder is None else Path(folder)
    ctx.apply_threads()
    layout, config = ctx.layout, ctx.config
    state: dict = {}

    def setup() -> dict:
        from grasp_cli.train import TrainRecipe

        tasks = read_tasks(layout.tasks)
        bundle = new_bundle(ctx, stage_data_shape(ctx, corpus, tasks))
        init = ensure_reference(ctx, corpus, bundle) if config.retrain.init == "reference" else None
        return {
            "bundle": bundle,
            "init": init,
            "recipe": TrainRecipe.from_section(config.retrain),
            "data": corpus.to_torch(),
            "tasks": {name: examples.to_torch() for name, examples in tasks.items()},
        }

    def work(units: list[int]) -> list[dict]:
        from grasp_cli.train import evaluate_tasks, train, train_many

        if not state:
            state.update(setup())
        group = [jobs[u] for u in units]
        indices = [rows_of(job) for job in group]
        for job, rows in zip(group, indices, strict=True):
            if len(rows) == 0:
                raise InputError(f"subset {job.subset_id} is empty; check the [subsets] design")
        import time

        t0 = time.perf_counter()
        if len(group) == 1:
            results = [
                train(
                    state["bundle"],
                    state["data"],
                    indices[0],
                    state["recipe"],
                    group[0].seed,
                    init_state=state["init"],
                    device=ctx.device,
                )
            ]
        else:
            results = train_many(
                state["bundle"],
                state["data"],
                indices,
                state["recipe"],
                [j.seed for j in group],
                init_state=state["init"],
                device=ctx.device,
            )
        wall = (time.perf_counter() - t0) / len(group)
        infos = []
        for unit, job, result in zip(units, group, results, strict=True):
            metrics = evaluate_tasks(
                state["bundle"],
                result.state_dict,
                state["tasks"],
                config.retrain.eval_batch_size,
                device=ctx.device,
            )
            part = target / f"part-{unit:06d}.parquet"
            write_table(
                part,
                result_table(
                    job.subset_id, job.label, job.seed, state["recipe"].steps, wall, metrics
                ),
            )
            infos.append(
                {
                    "subset_id": job.subset_id,
                    "seed": job.seed,
                    "files": {part.name: file_digest([part])},
                }
            )
        return infos

    report = run_units(
        ctx,
        artifact,
        len(jobs),
        work,
        seeds={"retrain": ctx.config.seed("retrain")},
        extra={"jobs": len(jobs), **(extra or {})},
        limit=limit,
        order=order,
        group=max(1, config.retrain.parallel_models),
        unit_name="runs",
        skeleton=skeleton,
        folder=target,
    )
    rate = (
        f"{len(report.done) / report.elapsed_s * 3600:.0f} runs/hour"
        if report.done and report.elapsed_s > 0
        else "nothing to do"
    )
    return f"{artifact}: trained {len(report.done)} runs in {report.elapsed_s:.1f}s ({rate}); " + (
        f"{report.folder} complete"
        if report.complete
        else f"{report.left} of {len(jobs)} runs left"
    )


def run_curation(ctx: StageContext, limit: int | None = None) -> str:
    """Train on each curation selection (``RUN/selection/curation.parquet``, and ``whole`` = the
    whole corpus) with each of ``select.curation_seeds`` seeds, the same recipe as retraining."""
    layout, config = ctx.layout, ctx.config
    manifest = require(layout, "selection", config, force=ctx.force)
    corpus = open_corpus(layout.corpus)
    table = read_table(layout.selection / "curation.parquet")
    selections = np.array(table.column("selection").to_pylist(), dtype=object)
    names = sorted(set(selections.tolist()) | set(manifest.extra.get("selections", {})))
    rows, known = corpus.positions(table.column("id").to_numpy())
    if not known.all():
        raise InputError(
            f"{layout.selection / 'curation.parquet'}: ids not in {layout.corpus}; "
            "rerun `grasp select`"
        )
    members = {name: rows[selections == name].tolist() for name in names}
    if "whole" in members:
        members["whole"] = list(range(len(corpus)))
    seeds = [ctx.config.seed("retrain") + extra for extra in range(config.select.curation_seeds)]
    jobs = [Job(index, seed, name) for seed in seeds for index, name in enumerate(names)]
    return train_jobs(
        ctx,
        "curation",
        jobs,
        lambda job: np.sort(np.array(members[job.label])),
        corpus,
        limit,
    )
