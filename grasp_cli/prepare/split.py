"""Which units go to the corpus and which to the target tasks: one rule for text and images.

A *unit* is what is never split between corpus and task: a document (text) or an image. A
unit becomes rows (byte sequences, or its one image). Every decision is a function of the
unit's id and one seeded 64-bit key, so it needs no global list, gives the same answer in
whatever order or shard a unit is read, and memory stays bounded:

- **holdout**: a unit of a held-out domain goes to that domain's task when
  ``key("holdout", id) / 2**64 < prepare.holdout_fraction``; if that holds out none of a
  domain's units, the one with the smallest key goes anyway, and if it holds out all, the
  one with the largest key stays (at least one unit held out, never all);
- **unit cap** (``prepare.max_docs_per_domain``): each domain keeps the units with the
  smallest ``(key("unit-cap", id), unit number)`` — a bottom-k sample, applied before the
  holdout split as before;
- **row caps** (``prepare.max_seqs_per_domain`` per corpus domain, ``prepare.max_task_seqs``
  per task): the rows with the smallest ``(row key, row id)``; row j of a unit has the key
  ``mix(key("rows", id) + j)``.

A bottom-k sample of a union is the bottom-k of the per-part bottom-k samples, so each shard
keeps at most ``k`` candidates per domain and the final step picks the global ones.
Keys come from ``unit_keys``/``row_keys`` and nothing else (the one way seeds are derived).
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from grasp_cli.errors import InputError, UsageError

UINT64_SPAN = float(2**64)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class PrepareSummary:
    corpus_rows: int
    domains: dict[str, int]
    tasks: dict[str, int]
    unit: str = "sequences"  # what a row is: "sequences" (text) or "images"


@dataclass(frozen=True)
class Noun:
    """How messages name a unit ("document"/"documents" or "image"/"images")."""

    one: str
    many: str


DOCUMENTS = Noun("document", "documents")
IMAGES = Noun("image", "images")


# ---------------------------------------------------------------- seeded keys


def unit_key(seed: int, purpose: str, name: str) -> int:
    """A uniform 64-bit key of ``name`` for one ``purpose`` ("holdout", "unit-cap", "rows", ...)."""
    digest = hashlib.blake2b(f"{seed}:{purpose}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection of uint64 that spreads consecutive inputs uniformly."""
    z = values.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


def row_keys(seed: int, name: str, first: int, count: int) -> np.ndarray:
    """Keys (uint64 ``[count]``) of rows ``first .. first+count-1`` of the unit ``name``."""
    bases = np.full(count, unit_key(seed, "rows", name), dtype=np.uint64)
    return mix_rows(bases, np.arange(first, first + count, dtype=np.uint64))


def mix_rows(bases: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Row keys from each row's unit base key (``unit_key(seed, "rows", id)``) and its position
    in the unit: ``row_keys`` for many units at once (uint64 arrays of one length)."""
    with np.errstate(over="ignore"):
        return _mix(bases.astype(np.uint64) + positions.astype(np.uint64) * _GOLDEN)


def is_held(seed: int, name: str, fraction: float) -> bool:
    """Whether the unit ``name`` of a held-out domain goes to its task."""
    return unit_key(seed, "holdout", name) / UINT64_SPAN < fraction


# ---------------------------------------------------------------- bottom-k samples


def smallest(keys: np.ndarray, ties: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` entries with the smallest ``(keys, ties)`` (all when fewer)."""
    if len(keys) <= k:
        return np.arange(len(keys))
    order = np.lexsort((ties, keys))
    return np.sort(order[:k])


def threshold(keys: np.ndarray, ties: np.ndarray, k: int) -> tuple[int, int] | None:
    """The ``k``-th smallest ``(key, tie)``; None when there are at most ``k`` entries."""
    if len(keys) <= k:
        return None
    order = np.lexsort((ties, keys))
    last = order[k - 1]
    return int(keys[last]), int(ties[last])


def at_most(keys: np.ndarray, ties: np.ndarray, limit: tuple[int, int] | None) -> np.ndarray:
    """Mask of entries with ``(key, tie) <= limit`` (all when ``limit`` is None)."""
    if limit is None:
        return np.ones(len(keys), dtype=bool)
    key, tie = np.uint64(limit[0]), limit[1]
    keys = keys.astype(np.uint64, copy=False)
    return (keys < key) | ((keys == key) & (ties <= tie))


@dataclass
class BottomK:
    """The ``cap`` smallest-keyed items of each group, kept in bounded memory.

    ``add(group, keys, ties, payload)`` appends candidates; when a group holds ``2 * cap``
    they are pruned back to ``cap`` (amortized O(1) per item). ``items()`` gives each group's
    survivors; their order is not defined (callers sort by what they need).
    """

    cap: int
    groups: dict[str, list] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)

    def add(self, group: str, keys: np.ndarray, ties: np.ndarray, payload: object) -> None:
        self.groups.setdefault(group, []).append((keys, ties, payload))
        self.sizes[group] = self.sizes.get(group, 0) + len(keys)
        if self.sizes[group] >= 2 * self.cap:
            self._prune(group)

    def _prune(self, group: str) -> None:
        entries = self.groups[group]
        keys = np.concatenate([e[0] for e in entries])
        ties = np.concatenate([e[1] for e in entries])
        owner = np.concatenate([np.full(len(e[0]), i) for i, e in enumerate(entries)])
        offset = np.concatenate([np.arange(len(e[0])) for e in entries])
        keep = smallest(keys, ties, self.cap)
        kept = []
        for index, entry in enumerate(entries):
            rows = offset[keep[owner[keep] == index]]
            if len(rows):
                kept.append((entry[0][rows], entry[1][rows], _take(entry[2], rows)))
        self.groups[group] = kept
        self.sizes[group] = sum(len(e[0]) for e in kept)

    def items(self) -> dict[str, list]:
        for group in list(self.groups):
            if self.sizes[group] > self.cap:
                self._prune(group)
        return self.groups


def _take(payload: object, rows: np.ndarray) -> object:
    """Rows ``rows`` of a payload: anything with ``take`` (``Examples``), a tuple of them, or a
    list (one entry per key)."""
    if isinstance(payload, tuple):
        return tuple(_take(p, rows) for p in payload)
    if isinstance(payload, list):
        return [payload[i] for i in rows]
    if isinstance(payload, dict):
        return {k: v[rows] for k, v in payload.items()}
    return payload.take(rows)


# ---------------------------------------------------------------- checks


def check_holdout(domain: str, units: int, known: list[str], noun: Noun) -> None:
    """Each held-out domain must exist and have two units (one for the task, one to keep)."""
    if units == 0:
        raise InputError(
            f"prepare.holdout_domains: no {noun.many} in domain {domain!r} "
            f"(domains: {', '.join(sorted(known))})"
        )
    if units < 2:
        raise InputError(
            f"prepare.holdout_domains: domain {domain!r} has one {noun.one}; "
            "need two to hold one out"
        )


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


def warn_verbatim_overlap(shared: dict[str, tuple[int, int]]) -> None:
    """Warn for each task with documents whose text also appears, verbatim, in the corpus.

    ``shared``: task -> (documents also in the corpus, documents of the task)."""
    for name, (count, total) in sorted(shared.items()):
        if count:
            print(
                f"warning: {count} of {total} documents of task {name!r} also appear "
                "verbatim in the corpus (target leakage: its loss will look better than it is)",
                file=sys.stderr,
            )
