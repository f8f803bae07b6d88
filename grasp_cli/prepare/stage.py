"""Build ``RUN/corpus`` and ``RUN/tasks`` from documents, atomically, with manifests."""

from __future__ import annotations

import hashlib
import math
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from grasp_cli.artifacts.atomic import (
    _tmp_name,
    creation_lock,
    replace_dir,
    sweep_debris,
    writing,
)
from grasp_cli.artifacts.examples import Examples, examples_to_table, write_examples
from grasp_cli.artifacts.layout import RunLayout, check_safe_name
from grasp_cli.artifacts.manifest import build_manifest, folder_digest, write_manifest
from grasp_cli.artifacts.tables import write_table
from grasp_cli.config import GraspConfig
from grasp_cli.errors import InputError, UsageError
from grasp_cli.prepare.documents import (
    Document,
    default_demo_holdout,
    demo_documents,
    expand_inputs,
    load_documents,
)
from grasp_cli.prepare.images import inputs_are_images
from grasp_cli.prepare.tokens import byte_sequences


@dataclass
class PrepareSummary:
    corpus_rows: int
    domains: dict[str, int]
    tasks: dict[str, int]
    unit: str = "sequences"  # what a row is: "sequences" (text) or "images"


def split_holdout(
    documents: list[Document], domains: list[str], fraction: float, seed: int
) -> tuple[list[Document], dict[str, list[Document]]]:
    """Move a seeded ``fraction`` of each named domain's documents (at least one, never all) to a task."""
    by_domain: dict[str, list[Document]] = defaultdict(list)
    for document in documents:
        by_domain[document.domain].append(document)
    held: dict[str, list[Document]] = {}
    held_ids: set[str] = set()
    rng = np.random.default_rng(seed)
    for domain in domains:
        pool = by_domain.get(domain)
        if not pool:
            raise InputError(
                f"prepare.holdout_domains: no documents in domain {domain!r} "
                f"(domains: {', '.join(sorted(by_domain))})"
            )
        if len(pool) < 2:
            raise InputError(
                f"prepare.holdout_domains: domain {domain!r} has one document; need two to hold one out"
            )
        count = min(len(pool) - 1, max(1, math.ceil(fraction * len(pool))))
        chosen = rng.choice(len(pool), size=count, replace=False)
        held[domain] = [pool[i] for i in sorted(chosen)]
        held_ids.update(d.doc_id for d in held[domain])
    rest = [d for d in documents if d.doc_id not in held_ids]
    return rest, held


def tokenize_documents(
    documents: list[Document], seq_len: int, cap_per_domain: int, seed: int
) -> Examples:
    """Rows of byte tokens for ``documents`` (in order), optionally a seeded sample per domain."""
    rows, domains, docs = [], [], []
    for document in documents:
        sequences = byte_sequences(document.text, seq_len)
        rows.append(sequences)
        domains += [document.domain] * len(sequences)
        docs += [document.doc_id] * len(sequences)
    tokens = np.concatenate(rows) if rows else np.zeros((0, seq_len + 1), np.int32)
    domains_arr, docs_arr = np.array(domains, dtype=object), np.array(docs, dtype=object)
    keep = np.arange(len(tokens))
    if cap_per_domain > 0:
        rng = np.random.default_rng(seed)
        kept = []
        for domain in sorted(set(domains)):
            members = np.flatnonzero(domains_arr == domain)
            if len(members) > cap_per_domain:
                members = np.sort(rng.choice(members, size=cap_per_domain, replace=False))
            kept.append(members)
        keep = np.sort(np.concatenate(kept)) if kept else keep
    return Examples(
        np.arange(len(keep), dtype=np.int64),
        domains_arr[keep],
        docs_arr[keep],
        {"tokens": tokens[keep]},
    )


def run_prepare(config: GraspConfig, layout: RunLayout) -> PrepareSummary:
    section = config.prepare
    if section.demo_images or (not section.demo and inputs_are_images(section.inputs)):
        from grasp_cli.prepare.images import run_prepare_images

        return run_prepare_images(config, layout)
    seed = config.seed("prepare")
    if section.demo:
        documents = demo_documents(section.demo_domains or None)
        holdout = section.holdout_domains or ([] if section.tasks else default_demo_holdout())
    else:
        if not section.inputs:
            raise InputError("prepare: no inputs; give files/folders/globs, or --demo")
        documents = load_documents(section.inputs)
        holdout = section.holdout_domains
    if section.max_docs_per_domain > 0:
        documents = _cap_documents(documents, section.max_docs_per_domain, seed)
    documents, held = split_holdout(documents, holdout, section.holdout_fraction, seed)
    if not section.demo:
        check_no_shared_files(
            expand_inputs(section.inputs),
            {name: expand_inputs([pattern]) for name, pattern in section.tasks.items()},
        )
    for name, patterns in section.tasks.items():
        held[name] = load_documents([patterns])
    warn_verbatim_overlap(documents, held)
    if not held:
        raise InputError("prepare: no target tasks; give --task NAME=PATH or --holdout-domains")

    corpus = tokenize_documents(documents, section.seq_len, section.max_seqs_per_domain, seed)
    if len(corpus) == 0:
        raise InputError("prepare: the inputs give no sequences (documents shorter than 16 bytes?)")
    tasks = {
        name: tokenize_documents(docs, section.seq_len, 0, seed)
        for name, docs in sorted(held.items())
    }
    for name, examples in tasks.items():
        if len(examples) == 0:
            raise InputError(
                f"prepare: task {name!r} has no sequences (its documents are too short)"
            )
        if section.max_task_seqs > 0 and len(examples) > section.max_task_seqs:
            rng = np.random.default_rng(seed + 1)
            keep = np.sort(rng.choice(len(examples), size=section.max_task_seqs, replace=False))
            tasks[name] = examples.take(keep)
            tasks[name].ids = np.arange(len(keep), dtype=np.int64)
    write_prepared(config, layout, corpus, tasks, seed)
    counts = dict(zip(*np.unique(corpus.domains.astype(str), return_counts=True), strict=True))
    return PrepareSummary(
        len(corpus), {k: int(v) for k, v in counts.items()}, {k: len(v) for k, v in tasks.items()}
    )


def _cap_documents(documents: list[Document], cap: int, seed: int) -> list[Document]:
    rng = np.random.default_rng(seed + 2)
    by_domain: dict[str, list[int]] = defaultdict(list)
    for index, document in enumerate(documents):
        by_domain[document.domain].append(index)
    keep: list[int] = []
    for indices in by_domain.values():
        keep += sorted(rng.choice(indices, size=min(cap, len(indices)), replace=False).tolist())
    return [documents[i] for i in sorted(keep)]


def write_prepared(
    config: GraspConfig,
    layout: RunLayout,
    corpus: Examples,
    tasks: dict[str, Examples],
    seed: int,
    extra: dict | None = None,
) -> None:
    """Write corpus and tasks as one commit; manifests last, so nothing half-done looks complete.

    Both folders are built in full beside the run first; both manifests carry one
    ``prepare_id`` (a digest of both contents); only then are they swapped in, corpus first.
    A prepare killed between the two swaps leaves ids that differ, which every reader refuses
    (``manifest.check_prepared_pair``): a new corpus is never paired with old tasks. Only this
    stage's own debris (``.corpus.tmp-*``, ``.tasks.old-*``, ...) is swept from the run folder.
    ``extra`` is added to the corpus manifest (e.g. an image corpus's class names).
    """
    layout.root.mkdir(parents=True, exist_ok=True)
    section = config.prepare
    corpus_extra = {"rows": len(corpus), "kind": "image" if corpus.is_image else "tokens"}
    if "tokens" in corpus.fields:
        corpus_extra["seq_len"] = int(corpus.fields["tokens"].shape[1] - 1)
    else:
        corpus_extra["image_shape"] = list(corpus.fields["image"].shape[1:])
        corpus_extra["num_classes"] = int(corpus.fields["label"].max()) + 1
    corpus_extra.update(extra or {})
    with creation_lock(layout.corpus):
        sweep_debris(layout.root, [layout.corpus.name, layout.tasks.name])
        corpus_tmp, tasks_tmp = _tmp_name(layout.corpus), _tmp_name(layout.tasks)
        try:
            with writing(layout.corpus):
                corpus_tmp.mkdir()
                corpus_paths = write_examples(
                    corpus_tmp, corpus, section.shard_rows, section.row_group_rows
                )
            with writing(layout.tasks):
                tasks_tmp.mkdir()
                task_paths = []
                for name, examples in tasks.items():
                    path = tasks_tmp / f"{check_safe_name(name, 'task name')}.parquet"
                    write_table(path, examples_to_table(examples), section.row_group_rows)
                    task_paths.append(path)
            del corpus_paths, task_paths
            corpus_digest, tasks_digest = folder_digest(corpus_tmp), folder_digest(tasks_tmp)
            prepare_id = hashlib.sha256(f"{corpus_digest}:{tasks_digest}".encode()).hexdigest()[:20]
            write_manifest(
                corpus_tmp,
                build_manifest(
                    layout,
                    "corpus",
                    config,
                    seeds={"prepare": seed},
                    content=corpus_digest,
                    extra={**corpus_extra, "prepare_id": prepare_id},
                ),
            )
            write_manifest(
                tasks_tmp,
                build_manifest(
                    layout,
                    "tasks",
                    config,
                    seeds={"prepare": seed},
                    content=tasks_digest,
                    extra={
                        "tasks": {k: len(v) for k, v in tasks.items()},
                        "prepare_id": prepare_id,
                    },
                ),
            )
            replace_dir(corpus_tmp, layout.corpus)
            replace_dir(tasks_tmp, layout.tasks)
        finally:
            for tmp in (corpus_tmp, tasks_tmp):
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)


def check_no_shared_files(corpus_files: list[Path], task_files: dict[str, list[Path]]) -> None:
    """A file that is both a corpus input and a task's input is target leakage: refuse it."""
    corpus = {path.resolve(): path for path in corpus_files}
    for name, files in task_files.items():
        for path in files:
            if path.resolve() in corpus:
                raise UsageError(
                    f"--task {name}: {path} is also a corpus input: its documents would be trained "
                    "on and scored as the target (target leakage); take it out of the corpus inputs"
                )


def warn_verbatim_overlap(corpus: list[Document], held: dict[str, list[Document]]) -> None:
    """Warn when a task document's text also appears, verbatim, in the corpus (leakage)."""
    corpus_texts = {hashlib.sha1(d.text.encode()).digest() for d in corpus}
    for name, documents in sorted(held.items()):
        shared = sum(hashlib.sha1(d.text.encode()).digest() in corpus_texts for d in documents)
        if shared:
            print(
                f"warning: {shared} of {len(documents)} documents of task {name!r} also appear "
                "verbatim in the corpus (target leakage: its loss will look better than it is)",
                file=sys.stderr,
            )


def run_prepare_stage(ctx) -> str:
    """``grasp prepare``: build corpus and tasks; returns the summary lines."""
    summary = run_prepare(ctx.config, ctx.layout)
    tasks = ", ".join(f"{k} ({v})" for k, v in summary.tasks.items())
    return (
        f"corpus: {summary.corpus_rows} {summary.unit} in {len(summary.domains)} domains -> "
        f"{ctx.layout.corpus}\ntasks:  {tasks} -> {ctx.layout.tasks}"
    )
