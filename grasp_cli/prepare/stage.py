"""`grasp prepare`: read documents or images, split them (split.py), write corpus and tasks as one commit."""

from __future__ import annotations

import hashlib
import shutil

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
from grasp_cli.errors import ConfigError, InputError
from grasp_cli.prepare.digits import DEMO_IMAGE_HOLDOUT, digits_demo
from grasp_cli.prepare.documents import (
    Document,
    default_demo_holdout,
    demo_documents,
    expand_inputs,
    load_documents,
)
from grasp_cli.prepare.images import (
    ImageRecord,
    expand_image_inputs,
    inputs_are_images,
    label_codes,
    load_image_records,
    records_to_examples,
    stack_records,
)
from grasp_cli.prepare.split import (
    DOCUMENTS,
    IMAGES,
    PrepareSummary,
    SplitSeeds,
    cap_per_domain,
    cap_task,
    check_no_shared_files,
    holdout_indices,
    renumber,
    summarize,
    warn_verbatim_overlap,
)
from grasp_cli.prepare.tokens import byte_sequences


def tokenize_documents(documents: list[Document], seq_len: int) -> Examples:
    """Rows of byte tokens for ``documents``, in order (ids 0..n-1)."""
    rows, domains, docs = [], [], []
    for document in documents:
        sequences = byte_sequences(document.text, seq_len)
        rows.append(sequences)
        domains += [document.domain] * len(sequences)
        docs += [document.doc_id] * len(sequences)
    tokens = np.concatenate(rows) if rows else np.zeros((0, seq_len + 1), np.int32)
    return Examples(
        np.arange(len(tokens), dtype=np.int64),
        np.array(domains, dtype=object),
        np.array(docs, dtype=object),
        {"tokens": tokens},
    )


def run_prepare(config: GraspConfig, layout: RunLayout) -> PrepareSummary:
    """``grasp prepare``: read the inputs (text or images), split them, write corpus and tasks."""
    section = config.prepare
    seeds = SplitSeeds.from_seed(config.derived_seed(-1, "prepare"))
    if section.demo_images or (not section.demo and inputs_are_images(section.inputs)):
        corpus, tasks, extra = _split_images(config, seeds)
        unit = "images"
    else:
        corpus, tasks = _split_text(config, seeds)
        extra, unit = {}, "sequences"
    if not tasks:
        raise InputError("prepare: no target tasks; give --task NAME=PATH or --holdout-domains")
    tasks = {
        name: cap_task(examples, section.max_task_seqs, seeds.task_cap)
        for name, examples in sorted(tasks.items())
    }
    write_prepared(config, layout, corpus, tasks, seeds.holdout, extra=extra)
    return summarize(corpus, tasks, unit)


def _split_text(config: GraspConfig, seeds: SplitSeeds) -> tuple[Examples, dict[str, Examples]]:
    """Documents -> capped, held out, cut into byte sequences: the corpus and the tasks."""
    section = config.prepare
    if section.demo:
        documents = demo_documents(section.demo_domains or None)
        holdout = section.holdout_domains or ([] if section.tasks else default_demo_holdout())
    else:
        if not section.inputs:
            raise InputError("prepare: no inputs; give files/folders/globs, or --demo")
        documents = load_documents(section.inputs)
        holdout = section.holdout_domains
    if section.max_docs_per_domain > 0:
        keep = cap_per_domain(_domains(documents), section.max_docs_per_domain, seeds.unit_cap)
        documents = [documents[i] for i in keep]
    chosen = holdout_indices(
        _domains(documents), holdout, section.holdout_fraction, seeds.holdout, DOCUMENTS
    )
    held = {domain: [documents[i] for i in rows] for domain, rows in chosen.items()}
    moved = {int(i) for rows in chosen.values() for i in rows}
    documents = [d for i, d in enumerate(documents) if i not in moved]
    if not section.demo:
        check_no_shared_files(
            expand_inputs(section.inputs),
            {name: expand_inputs([pattern]) for name, pattern in section.tasks.items()},
        )
    for name, patterns in section.tasks.items():
        held[name] = load_documents([patterns])
    warn_verbatim_overlap(
        [d.text for d in documents], {k: [d.text for d in v] for k, v in held.items()}
    )
    if not held:
        raise InputError("prepare: no target tasks; give --task NAME=PATH or --holdout-domains")
    corpus = tokenize_documents(documents, section.seq_len)
    if section.max_seqs_per_domain > 0:
        keep = cap_per_domain(corpus.domains, section.max_seqs_per_domain, seeds.row_cap)
        corpus = renumber(corpus.take(keep))
    if len(corpus) == 0:
        raise InputError("prepare: the inputs give no sequences (documents shorter than 16 bytes?)")
    tasks = {name: tokenize_documents(docs, section.seq_len) for name, docs in held.items()}
    for name, examples in sorted(tasks.items()):
        if len(examples) == 0:
            raise InputError(
                f"prepare: task {name!r} has no sequences (its documents are too short)"
            )
    return corpus, tasks


def _domains(documents: list[Document]) -> np.ndarray:
    return np.array([d.domain for d in documents], dtype=object)


def _split_images(
    config: GraspConfig, seeds: SplitSeeds
) -> tuple[Examples, dict[str, Examples], dict]:
    """Images (or the digits demo) -> capped, held out: the corpus, the tasks, manifest extras."""
    section = config.prepare
    if section.demo:
        raise ConfigError("prepare.demo (text) and prepare.demo_images are exclusive; choose one")
    corpus, tasks, class_names = _load_images(config, seeds.holdout)
    holdout = section.holdout_domains
    if section.demo_images and not holdout and not section.tasks:
        holdout = DEMO_IMAGE_HOLDOUT
    if section.max_docs_per_domain > 0:
        keep = cap_per_domain(corpus.domains, section.max_docs_per_domain, seeds.unit_cap)
        corpus = renumber(corpus.take(keep))
    chosen = holdout_indices(
        corpus.domains, holdout, section.holdout_fraction, seeds.holdout, IMAGES
    )
    moved = np.zeros(len(corpus), dtype=bool)
    for domain, rows in chosen.items():
        tasks[domain] = renumber(corpus.take(rows))
        moved[rows] = True
    corpus = renumber(corpus.take(np.flatnonzero(~moved)))
    if not tasks:
        raise InputError("prepare: no target tasks; give --task NAME=PATH or --holdout-domains")
    if len(corpus) == 0:
        raise InputError("prepare: the corpus has no images left after holding out the tasks")
    num_classes = int(corpus.fields["label"].max()) + 1
    for name in sorted(tasks):
        labels = tasks[name].fields["label"]
        if labels.max() >= num_classes:
            raise InputError(
                f"task {name!r} has label {int(labels.max())} but the corpus only has labels "
                f"0..{num_classes - 1}; a classifier trained on the corpus cannot predict it"
            )
    return corpus, tasks, ({"class_names": class_names} if class_names else {})


def _load_images(config: GraspConfig, seed: int) -> tuple[Examples, dict[str, Examples], list[str]]:
    """Corpus, ``--task`` tasks and class names from the configured inputs (or the digits demo)."""
    section = config.prepare
    if section.demo_images:
        if section.inputs:
            raise ConfigError(
                "prepare.demo_images builds its own corpus; drop the inputs or set demo_images = false"
            )
        corpus = digits_demo(section.demo_image_shares, section.image_size, seed)
        tasks = {
            name: _demo_task(load_image_records([pattern]), corpus.fields["image"].shape[1:], name)
            for name, pattern in section.tasks.items()
        }
        return corpus, tasks, []
    if not section.inputs:
        raise InputError(
            "prepare: no inputs; give image files/folders/globs, or prepare.demo_images"
        )
    check_no_shared_files(
        [path for path, _ in expand_image_inputs(section.inputs)],
        {
            name: [path for path, _ in expand_image_inputs([pattern])]
            for name, pattern in section.tasks.items()
        },
    )
    corpus_records = load_image_records(section.inputs)
    task_records = {
        name: load_image_records([pattern]) for name, pattern in sorted(section.tasks.items())
    }
    everything = corpus_records + [r for records in task_records.values() for r in records]
    codes, class_names = label_codes([r.label for r in everything])
    images = stack_records(everything, section.image_size)
    corpus = records_to_examples(
        corpus_records, images[: len(corpus_records)], codes[: len(corpus_records)]
    )
    tasks = {}
    start = len(corpus_records)
    for name, records in task_records.items():
        stop = start + len(records)
        tasks[name] = records_to_examples(records, images[start:stop], codes[start:stop])
        start = stop
    return corpus, tasks, class_names


def _demo_task(records: list[ImageRecord], shape: tuple[int, ...], name: str) -> Examples:
    """A ``--task`` of the digits demo: resized to the demo's shape; labels must be digits 0..9."""
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
    return records_to_examples(records, images, codes)


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
