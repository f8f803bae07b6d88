"""`grasp prepare`: stream documents or images into corpus and tasks, sharded, committed as a pair.

``run_prepare`` builds the plan (inputs, holdout, caps, a key over the config and the inputs'
stamps), runs this process's shard of the stream (``stream.run_shard``), and the shard that
finds every shard done runs the final step (``stream.merge``) and commits corpus and tasks
together (``commit_prepared``). A rerun whose corpus and tasks already come from the same
plan does nothing (``--force`` rebuilds them).
"""

from __future__ import annotations

import functools
import hashlib
import shutil
from dataclasses import dataclass

from grasp_cli.artifacts.atomic import (
    _tmp_name,
    atomic_write_text,
    creation_lock,
    replace_dir,
    sweep_debris,
    writing,
)
from grasp_cli.artifacts.examples import BYTE_PAD_ID, BYTE_VOCAB_SIZE
from grasp_cli.artifacts.layout import SCRATCH, RunLayout, check_safe_name
from grasp_cli.artifacts.manifest import (
    build_manifest,
    check_prepared_pair,
    folder_digest,
    read_manifest,
    write_manifest,
)
from grasp_cli.artifacts.sharded import SHARED_DEBRIS_MIN_AGE_S
from grasp_cli.artifacts.shards import ShardSpec
from grasp_cli.config import GraspConfig, semantic_section
from grasp_cli.errors import ConfigError, GraspError, InputError
from grasp_cli.prepare.documents import (
    Repeats,
    default_demo_holdout,
    demo_sources,
    expand_inputs,
    text_sources,
)
from grasp_cli.prepare.images import (
    ImagePlan,
    examples_units,
    expand_image_inputs,
    image_sources,
    inputs_are_images,
    label_codes,
    load_image_records,
    records_to_examples,
    scan_images,
    stack_records,
)
from grasp_cli.prepare.merge import Merged, merge
from grasp_cli.prepare.split import DOCUMENTS, IMAGES, PrepareSummary, check_no_shared_files
from grasp_cli.prepare.stream import (
    Plan,
    missing_shards,
    plan_key,
    remove_staging,
    run_shard,
    shards_done,
    sweep_old_staging,
)
from grasp_cli.prepare.tokens import token_space
from grasp_cli.prepare.units import Source

PLAN_SCHEMA = 1


@dataclass
class PrepareResult:
    """What ``run_prepare`` did: the summary once corpus and tasks exist, or why not yet."""

    summary: PrepareSummary | None
    message: str = ""


def run_prepare(
    config: GraspConfig,
    layout: RunLayout,
    shard: ShardSpec | None = None,
    force: bool = False,
    progress: bool = False,
) -> PrepareResult:
    """``grasp prepare`` for one shard (default: the whole job) of the inputs."""
    shard = shard or ShardSpec()
    plan = build_plan(config, layout)
    layout.root.mkdir(parents=True, exist_ok=True)
    with creation_lock(layout.corpus):
        # only this stage's own debris: killed swaps, and staging of abandoned plans
        sweep_debris(layout.root, [layout.corpus.name, layout.tasks.name])
        sweep_old_staging(plan, SHARED_DEBRIS_MIN_AGE_S)
        if not force and _committed(layout, plan):
            remove_staging(plan, only_if_empty=True)  # an image plan scanned for nothing
            return PrepareResult(_summary_of(layout), "up to date")
        start = _corpus_fingerprint(layout)

    def finished_elsewhere() -> bool:  # another process committed this plan since we started
        return _committed(layout, plan) and _corpus_fingerprint(layout) != start

    try:
        run_shard(plan, shard, progress, finished_elsewhere)
    except GraspError:
        remove_staging(plan, only_if_empty=True)  # the shard removed its own folder
        raise
    with creation_lock(layout.corpus):
        if finished_elsewhere():
            return PrepareResult(_summary_of(layout), "finished by another shard")
        stats = shards_done(plan, shard.count)
        if stats is None:
            left = missing_shards(plan, shard.count)
            return PrepareResult(
                None,
                f"prepare: {shard} done; waiting for {len(left)} more (--shard "
                f"{', '.join(map(str, left[:12]))}{' ...' if len(left) > 12 else ''} of "
                f"{shard.count}; the last one to finish writes corpus and tasks)",
            )
        try:
            summary = _finalize(config, layout, plan, shard.count, stats)
        except InputError:
            remove_staging(plan)  # bad input over the whole: it cannot be prepared as it is
            raise
        remove_staging(plan)  # under the lock: a shard finishing now finds it committed
    return PrepareResult(summary)


# ---------------------------------------------------------------- the plan


def build_plan(config: GraspConfig, layout: RunLayout) -> Plan:
    """Sources, holdout and caps for this config; every shard of a job array builds the same."""
    section = config.prepare
    seed = config.seed("prepare")
    images = section.demo_images or (not section.demo and inputs_are_images(section.inputs))
    if images:
        return _image_plan(config, layout, seed)
    space = token_space(section)
    if section.demo:
        if space is not None and space.tokenizer is None:
            raise ConfigError(
                "prepare.demo is text: it needs prepare.tokenizer, not prepare.eos_id/vocab_size"
            )
        repeats = Repeats(section.demo_repeat_fraction, section.demo_repeat_copies, seed)
        sources = demo_sources(section.demo_domains or None, section.seq_len, space, repeats)
        holdout = section.holdout_domains or ([] if section.tasks else default_demo_holdout())
        patterns: list[str] = []
    else:
        if not section.inputs:
            raise InputError("prepare: no inputs; give files/folders/globs, or --demo")
        check_no_shared_files(
            expand_inputs(section.inputs),
            {name: expand_inputs([pattern]) for name, pattern in section.tasks.items()},
        )
        sources = text_sources(section.inputs, section.seq_len, space, section.token_dtype)
        holdout, patterns = section.holdout_domains, list(section.inputs)
    tasks = {
        name: text_sources([pattern], section.seq_len, space, section.token_dtype)
        for name, pattern in sorted(section.tasks.items())
    }
    extra = space.manifest() if space is not None else {}
    return _plan(config, layout, "tokens", sources, tasks, holdout, seed, patterns, extra)


def _plan(
    config: GraspConfig,
    layout: RunLayout,
    kind: str,
    sources: list[Source],
    tasks: dict[str, list[Source]],
    holdout: list[str],
    seed: int,
    patterns: list[str],
    extra: dict,
) -> Plan:
    section = config.prepare
    for name in [*tasks, *holdout]:
        check_safe_name(name, "task name")
    if not holdout and not tasks:
        raise InputError("prepare: no target tasks; give --task NAME=PATH or --holdout-domains")
    key = plan_key(
        {
            "schema": PLAN_SCHEMA,
            "kind": kind,
            "prepare": semantic_section(config, "prepare"),
            "seed": seed,
            "holdout": holdout,
            "sources": [s.stamp for s in sources],
            "tasks": {name: [s.stamp for s in group] for name, group in tasks.items()},
            "token_space": extra,  # the tokenizer's digest: a changed tokenizer.json re-prepares
        }
    )
    return Plan(
        kind=kind,
        sources=sources,
        task_sources=tasks,
        holdout=list(holdout),
        fraction=section.holdout_fraction,
        seed=seed,
        unit_cap=section.max_docs_per_domain,
        row_cap=section.max_seqs_per_domain if kind == "tokens" else 0,
        task_cap=section.max_task_seqs,
        shard_rows=section.shard_rows,
        row_group_rows=section.row_group_rows,
        key=key,
        staging=layout.root / SCRATCH / f"prepare-{key}",
        noun=DOCUMENTS if kind == "tokens" else IMAGES,
        patterns=patterns,
        manifest_extra=extra,
    )


def _image_plan(config: GraspConfig, layout: RunLayout, seed: int) -> Plan:
    """Images: the digits demo (one source), or image files scanned once for the plan."""
    section = config.prepare
    if section.demo:
        raise ConfigError("prepare.demo (text) and prepare.demo_images are exclusive; choose one")
    holdout = section.holdout_domains
    if section.demo_images:
        if section.inputs:
            raise ConfigError(
                "prepare.demo_images builds its own corpus; drop the inputs or set demo_images = false"
            )
        from grasp_cli.prepare.digits import DEMO_IMAGE_HOLDOUT, digits_demo

        demo = digits_demo(section.demo_image_shares, section.image_size, seed)
        stamp = f"digits:{sorted(section.demo_image_shares.items())}:{section.image_size}:{seed}"
        sources = [Source("digits demo", len(demo), stamp, functools.partial(examples_units, demo))]
        tasks = {
            name: [_demo_task_source(pattern, demo.fields["image"].shape[1:], name)]
            for name, pattern in sorted(section.tasks.items())
        }
        if not holdout and not section.tasks:
            holdout = DEMO_IMAGE_HOLDOUT
        plan = _plan(config, layout, "image", sources, tasks, holdout, seed, [], {})
        plan.manifest_extra["image_shape"] = list(demo.fields["image"].shape[1:])
        return plan
    if not section.inputs:
        raise InputError(
            "prepare: no inputs; give image files/folders/globs, or prepare.demo_images"
        )
    task_files = {
        name: expand_image_inputs([pattern]) for name, pattern in sorted(section.tasks.items())
    }
    corpus_files = expand_image_inputs(section.inputs)
    check_no_shared_files(
        [path for path, _ in corpus_files],
        {name: [path for path, _ in files] for name, files in task_files.items()},
    )
    stub = ImagePlan((), False, section.image_size)  # sources are stamped before the scan
    plan = _plan(
        config,
        layout,
        "image",
        image_sources(section.inputs, stub),
        {name: image_sources([section.tasks[name]], stub) for name in task_files},
        holdout,
        seed,
        list(section.inputs),
        {},
    )
    everything = corpus_files + [f for files in task_files.values() for f in files]
    images = _scanned(plan, everything, section.image_size)
    plan.sources = image_sources(section.inputs, images)
    plan.task_sources = {name: image_sources([section.tasks[name]], images) for name in task_files}
    plan.manifest_extra["image_shape"] = list(images.shape)
    if images.class_names:
        plan.manifest_extra["class_names"] = list(images.class_names)
    return plan


def _scanned(plan: Plan, files: list, image_size: int) -> ImagePlan:
    """The image plan of these inputs: scanned once (labels and headers) per staging folder."""
    import json

    path = plan.staging / "image-plan.json"
    plan.staging.mkdir(parents=True, exist_ok=True)
    with creation_lock(path):
        if path.is_file():
            return ImagePlan.from_json(json.loads(path.read_text(encoding="utf-8")))
        try:
            images = scan_images(files, image_size)
        except GraspError:
            remove_staging(plan, only_if_empty=True)
            raise
        atomic_write_text(path, json.dumps(images.to_json()))
        return images


def _demo_task_source(pattern: str, shape: tuple[int, ...], name: str) -> Source:
    """A ``--task`` of the digits demo: resized to the demo's shape; labels must be 0..9."""

    def units():
        records = load_image_records([pattern])
        codes, names = label_codes([r.label for r in records])
        if names:
            raise InputError(
                f"task {name!r}: the digits demo needs integer labels 0..9, got class names"
            )
        images = stack_records(records, int(shape[0]))
        if images.shape[1:] != tuple(shape):
            raise InputError(
                f"task {name!r}: images have shape {list(images.shape[1:])}, the demo corpus {list(shape)}"
            )
        yield from examples_units(records_to_examples(records, images, codes))

    stamps = [
        f"{path}:{path.stat().st_size}:{path.stat().st_mtime_ns}"
        for path, _ in expand_image_inputs([pattern])
    ]
    return Source(pattern, 0, ";".join(stamps), units)


# ---------------------------------------------------------------- the final step and the commit


def _finalize(
    config: GraspConfig, layout: RunLayout, plan: Plan, count: int, stats: list[dict]
) -> PrepareSummary:
    """Build corpus and tasks from every shard's staging folder and commit them (under the lock)."""
    sweep_debris(layout.root, [layout.corpus.name, layout.tasks.name])
    corpus_tmp, tasks_tmp = _tmp_name(layout.corpus), _tmp_name(layout.tasks)
    try:
        with writing(layout.corpus):
            merged = merge(plan, count, stats, corpus_tmp, tasks_tmp)
        commit_prepared(config, layout, plan, corpus_tmp, tasks_tmp, merged)
    finally:
        for tmp in (corpus_tmp, tasks_tmp):
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    unit = "sequences" if plan.kind == "tokens" else "images"
    return PrepareSummary(merged.corpus_rows, merged.domains, merged.tasks, unit)


def commit_prepared(
    config: GraspConfig, layout: RunLayout, plan: Plan, corpus_tmp, tasks_tmp, merged: Merged
) -> None:
    """Commit corpus and tasks as one: manifests last, so nothing half-done looks complete.

    Both folders are built in full beside the run first; both manifests carry one
    ``prepare_id`` (a digest of both contents); only then are they swapped in, corpus first.
    A prepare killed between the two swaps leaves ids that differ, which every reader refuses
    (``manifest.check_prepared_pair``): a new corpus is never paired with old tasks.
    """
    corpus_digest, tasks_digest = folder_digest(corpus_tmp), folder_digest(tasks_tmp)
    prepare_id = hashlib.sha256(f"{corpus_digest}:{tasks_digest}".encode()).hexdigest()[:20]
    corpus_extra = {
        "rows": merged.corpus_rows,
        "kind": "tokens" if plan.kind == "tokens" else "image",
        # byte tokens by default: ids 0-255, pad 256 (models.transformer); a tokenizer's
        # pad_id / vocab_size / eos_id (merged.extra) replace them
        **(
            {
                "seq_len": config.prepare.seq_len,
                "pad_id": BYTE_PAD_ID,
                "vocab_size": BYTE_VOCAB_SIZE,
            }
            if plan.kind == "tokens"
            else {}
        ),
        **merged.extra,
        "domains": merged.domains,
        "plan": plan.key,
        "prepare_id": prepare_id,
    }
    seeds = {"prepare": plan.seed}
    write_manifest(
        corpus_tmp,
        build_manifest(
            layout, "corpus", config, seeds=seeds, content=corpus_digest, extra=corpus_extra
        ),
    )
    tasks_extra = {"tasks": merged.tasks, "plan": plan.key, "prepare_id": prepare_id}
    write_manifest(
        tasks_tmp,
        build_manifest(
            layout, "tasks", config, seeds=seeds, content=tasks_digest, extra=tasks_extra
        ),
    )
    replace_dir(corpus_tmp, layout.corpus)
    replace_dir(tasks_tmp, layout.tasks)


def _committed(layout: RunLayout, plan: Plan) -> bool:
    """Corpus and tasks exist, complete, from this very plan and one prepare run."""
    try:
        manifests = [read_manifest(layout.corpus), read_manifest(layout.tasks)]
        if any(m is None or not m.complete or m.extra.get("plan") != plan.key for m in manifests):
            return False
        check_prepared_pair(layout)
    except GraspError:
        return False
    return True


def _corpus_fingerprint(layout: RunLayout) -> str | None:
    try:
        manifest = read_manifest(layout.corpus)
    except GraspError:
        return None
    return None if manifest is None else manifest.fingerprint + manifest.created


def _summary_of(layout: RunLayout) -> PrepareSummary:
    corpus, tasks = read_manifest(layout.corpus), read_manifest(layout.tasks)
    unit = "images" if corpus.extra.get("kind") == "image" else "sequences"
    return PrepareSummary(
        int(corpus.extra.get("rows", 0)),
        dict(corpus.extra.get("domains", {})),
        dict(tasks.extra.get("tasks", {})),
        unit,
    )


def run_prepare_stage(ctx) -> str:
    """``grasp prepare`` (one shard of it under ``--shard``): build corpus and tasks; returns
    the summary lines, or what the shard did and which shards are still to come."""
    result = run_prepare(ctx.config, ctx.layout, ctx.shard, ctx.force, ctx.progress)
    summary = result.summary
    if summary is None:
        return result.message
    tasks = ", ".join(f"{k} ({v})" for k, v in summary.tasks.items())
    return (
        f"corpus: {summary.corpus_rows} {summary.unit} in {len(summary.domains)} domains -> "
        f"{ctx.layout.corpus}\ntasks:  {tasks} -> {ctx.layout.tasks}"
        + (f" ({result.message})" if result.message else "")
    )
