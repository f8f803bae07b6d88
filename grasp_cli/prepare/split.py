"""Which examples go to the corpus and which to the target tasks: one path for text and images.

A *unit* is what is never split between corpus and task: a document (text) or an image.
Both modalities go through the same steps, in this order:

1. an optional cap on units per domain (``prepare.max_docs_per_domain``);
2. the holdout split: a seeded fraction of each named domain's units becomes that domain's
   task (at least one unit, never all);
3. (text only) the units are cut into rows; an optional cap on corpus rows per domain
   (``prepare.max_seqs_per_domain``);
4. an optional cap on rows per task (``prepare.max_task_seqs``).

Every random choice comes from ``SplitSeeds``, derived from the one prepare seed in one place.
"""

from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from grasp_cli.artifacts.examples import Examples
from grasp_cli.errors import InputError, UsageError


@dataclass
class PrepareSummary:
    corpus_rows: int
    domains: dict[str, int]
    tasks: dict[str, int]
    unit: str = "sequences"  # what a row is: "sequences" (text) or "images"


@dataclass(frozen=True)
class SplitSeeds:
    """The random streams of the split, all derived from the prepare seed here and nowhere else."""

    holdout: int
    unit_cap: int
    row_cap: int
    task_cap: int

    @classmethod
    def from_seed(cls, seed: int) -> SplitSeeds:
        return cls(holdout=seed, unit_cap=seed + 2, row_cap=seed, task_cap=seed + 1)


@dataclass(frozen=True)
class Noun:
    """How error messages name a unit ("document"/"documents" or "image"/"images")."""

    one: str
    many: str


DOCUMENTS = Noun("document", "documents")
IMAGES = Noun("image", "images")


def holdout_indices(
    domains: np.ndarray, holdout: list[str], fraction: float, seed: int, noun: Noun = DOCUMENTS
) -> dict[str, np.ndarray]:
    """Units moved to each held-out domain's task: domain -> sorted unit indices.

    ``domains``: str ``[U]``, one per unit. For each named domain a seeded ``fraction`` of its
    units (rounded up; at least one, never all) is chosen.
    """
    rng = np.random.default_rng(seed)
    held: dict[str, np.ndarray] = {}
    for domain in holdout:
        pool = np.flatnonzero(domains == domain)
        if len(pool) == 0:
            present = ", ".join(sorted(set(domains.tolist())))
            raise InputError(
                f"prepare.holdout_domains: no {noun.many} in domain {domain!r} (domains: {present})"
            )
        if len(pool) < 2:
            raise InputError(
                f"prepare.holdout_domains: domain {domain!r} has one {noun.one}; "
                "need two to hold one out"
            )
        count = min(len(pool) - 1, max(1, math.ceil(fraction * len(pool))))
        held[domain] = np.sort(pool[rng.choice(len(pool), size=count, replace=False)])
    return held


def cap_per_domain(domains: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Sorted indices kept when each domain keeps at most ``cap`` of its entries (seeded)."""
    rng = np.random.default_rng(seed)
    kept = [np.arange(0)]
    for domain in sorted(set(domains.tolist())):
        members = np.flatnonzero(domains == domain)
        if len(members) > cap:
            members = np.sort(rng.choice(members, size=cap, replace=False))
        kept.append(members)
    return np.sort(np.concatenate(kept)).astype(np.int64)


def cap_task(examples: Examples, cap: int, seed: int) -> Examples:
    """At most ``cap`` rows of a task (seeded), renumbered 0..n-1; ``cap`` 0 keeps all."""
    if cap <= 0 or len(examples) <= cap:
        return examples
    rng = np.random.default_rng(seed)
    return renumber(examples.take(np.sort(rng.choice(len(examples), size=cap, replace=False))))


def renumber(examples: Examples) -> Examples:
    """The same rows with ids 0..n-1."""
    examples.ids = np.arange(len(examples), dtype=np.int64)
    return examples


def summarize(corpus: Examples, tasks: dict[str, Examples], unit: str) -> PrepareSummary:
    """Rows per corpus domain and per task, for the stage's one-line report."""
    counts = dict(zip(*np.unique(corpus.domains.astype(str), return_counts=True), strict=True))
    return PrepareSummary(
        len(corpus),
        {k: int(v) for k, v in counts.items()},
        {k: len(v) for k, v in tasks.items()},
        unit=unit,
    )


# ---------------------------------------------------------------- target leakage


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


def warn_verbatim_overlap(corpus_texts: list[str], held: dict[str, list[str]]) -> None:
    """Warn when a task document's text also appears, verbatim, in the corpus (leakage)."""
    digests = {hashlib.sha1(text.encode()).digest() for text in corpus_texts}
    for name, texts in sorted(held.items()):
        shared = sum(hashlib.sha1(text.encode()).digest() in digests for text in texts)
        if shared:
            print(
                f"warning: {shared} of {len(texts)} documents of task {name!r} also appear "
                "verbatim in the corpus (target leakage: its loss will look better than it is)",
                file=sys.stderr,
            )
