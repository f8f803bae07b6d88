"""The streaming, shardable core of ``grasp prepare``.

Shard ``i`` of ``n`` (``--shard/--num-shards`` or a SLURM array) owns a contiguous run of the
input files (balanced by bytes) and streams them one unit at a time into a staging folder
``RUN/.grasp/prepare-<plan key>/shard-IIIII-of-NNNNN/``:

- ``corpus/part-*.parquet``: corpus rows, written as parts fill (with key columns
  ``_unit_key``, ``_unit_no``, ``_row_key`` when a cap needs a final choice);
- ``held/<domain>/part-*.parquet``: rows of held-out units, with their keys;
- ``reserve/``: copies of each held-out domain's extreme units (see ``_Reserve``);
- ``units.parquet``: with ``max_docs_per_domain``, the shard's bottom-k units per domain;
- ``ledger/run-*.npy``: per unit, hashes of its id and text (duplicate ids, leakage);
- ``done.json``: written last; a shard with it is finished, and a rerun skips it.

A shard holds a batch of rows, one row group per writer, and what the caps keep (at most
``2 * cap`` rows or units per domain): memory is bounded by the caps, not by the corpus.
The shard that finds every shard done runs the final step (``merge``): checks over the whole
input (duplicate ids, holdout counts, leakage), the caps' global thresholds, the holdout
guarantee, and the corpus (parts hard-linked in order, or rewritten where a cap or a moved
unit changed them) and tasks built beside the run; ``stage.py`` commits the pair. Row ids
are ``input number * 2**32 + row number within that input``: unique, and the same whatever
the number of shards. A killed shard loses only its own folder; its rerun starts it again.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq
from tqdm import tqdm

from grasp_cli.artifacts.atomic import atomic_write_text, creation_lock, writing
from grasp_cli.artifacts.examples import Examples, PartWriter, _table_to_examples
from grasp_cli.artifacts.shards import ShardSpec
from grasp_cli.artifacts.tables import parquet_file, read_table
from grasp_cli.errors import InputError
from grasp_cli.prepare.split import (
    DOCUMENTS,
    UINT64_SPAN,
    BottomK,
    Noun,
    at_most,
    check_holdout,
    mix_rows,
    row_keys,
    threshold,
    unit_key,
)
from grasp_cli.prepare.units import Source

ROW_BITS = 32  # id = input number << ROW_BITS | row number within the input
KEY_COLUMNS = ("_unit_key", "_unit_no", "_row_key")
DONE = "done.json"
LEDGER_DTYPE = np.dtype([("id", "<u8"), ("text", "<u8"), ("unit", "<i8"), ("role", "<i4")])
LEDGER_RUN_ROWS = 1 << 18
CORPUS_ROLE, SKIPPED_ROLE = -1, -2  # ledger roles; >= 0 is the index of a held-out domain


@dataclass
class Plan:
    """Everything a shard and the final step need, the same in every process of a job array.

    ``key`` digests the config and the inputs' stamps: it names the staging folder, so a
    rerun with the same inputs resumes and a changed input starts afresh."""

    kind: str  # "tokens" or "image"
    sources: list[Source]
    task_sources: dict[str, list[Source]]
    holdout: list[str]
    fraction: float
    seed: int
    unit_cap: int
    row_cap: int
    task_cap: int
    shard_rows: int
    row_group_rows: int
    key: str
    staging: Path
    noun: Noun = DOCUMENTS
    patterns: list[str] = field(default_factory=list)
    manifest_extra: dict = field(default_factory=dict)

    @property
    def keyed_corpus(self) -> bool:
        """Corpus rows carry their keys (a cap decides their fate in the final step)."""
        return self.unit_cap > 0 or self.row_cap > 0

    def shard_dir(self, shard: ShardSpec) -> Path:
        return self.staging / f"shard-{shard.index:05d}-of-{shard.count:05d}"

    def owned(self, shard: ShardSpec) -> range:
        """The inputs shard ``shard`` reads: a contiguous run, balanced by bytes."""
        sizes = np.array([max(1, s.size) for s in self.sources], dtype=np.float64)
        starts = np.concatenate([[0.0], np.cumsum(sizes)[:-1]])
        total = float(sizes.sum())

        def bound(index: int) -> int:
            if index >= shard.count:
                return len(self.sources)
            return int(np.searchsorted(starts, total * index / shard.count, side="left"))

        return range(bound(shard.index), bound(shard.index + 1))


def plan_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- one shard


def run_shard(
    plan: Plan, shard: ShardSpec, progress: bool, finished_elsewhere: Callable[[], bool]
) -> bool:
    """Stream this shard's inputs into its staging folder; False when there was nothing to do
    (the shard is done, or another process already committed the whole plan)."""
    folder = plan.shard_dir(shard)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with creation_lock(folder):  # a second worker on the same shard waits, then skips
        if (folder / DONE).is_file() or finished_elsewhere():
            return False
        if folder.exists():  # what a killed attempt left
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        try:
            with writing(folder):
                stats = _stream(plan, shard, folder, progress)
            atomic_write_text(folder / DONE, json.dumps(stats))
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
    return True


class _RowSink:
    """Rows of one destination (the corpus, or one held-out domain's task): written as they
    come, or, with a cap, kept as a per-domain bottom-k and written sorted by id at the end."""

    def __init__(self, folder: Path, plan: Plan, keyed: bool, cap: int) -> None:
        self.writer = PartWriter(folder, plan.shard_rows, plan.row_group_rows)
        self.keyed, self.cap = keyed, cap
        self.sample = BottomK(cap) if cap > 0 else None
        self.rows: dict[str, int] = {}
        self.max_label = -1

    def add(self, rows: Examples, keys: dict[str, np.ndarray]) -> None:
        if not len(rows):
            return
        if self.sample is None:
            self._write(rows, keys)
            return
        for domain, members in _by_domain(rows.domains):
            part = rows.take(members)
            part_keys = {name: values[members] for name, values in keys.items()}
            self.sample.add(domain, part_keys["_row_key"], part.ids, (part, part_keys))

    def _write(self, rows: Examples, keys: dict[str, np.ndarray]) -> None:
        self.writer.write(rows, keys if self.keyed else None)
        for domain, members in _by_domain(rows.domains):
            self.rows[domain] = self.rows.get(domain, 0) + len(members)
        if "label" in rows.fields and len(rows):
            self.max_label = max(self.max_label, int(rows.fields["label"].max()))

    def close(self) -> list[Path]:
        if self.sample is not None:
            kept = [entry[2] for group in self.sample.items().values() for entry in group]
            if kept:
                rows = _concat_examples([k[0] for k in kept])
                keys = {n: np.concatenate([k[1][n] for k in kept]) for n in KEY_COLUMNS}
                order = np.argsort(rows.ids, kind="stable")
                for start in range(0, len(order), self.writer.row_group_rows):
                    chunk = order[start : start + self.writer.row_group_rows]
                    self._write(rows.take(chunk), {n: v[chunk] for n, v in keys.items()})
        return self.writer.close()


def _by_domain(domains: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """``(domain, row indices)`` for each domain among ``domains`` (one pass when all agree)."""
    if len(domains) and (domains[0] == domains[-1]) and (domains == domains[0]).all():
        yield str(domains[0]), np.arange(len(domains))
        return
    names, inverse = np.unique(domains.astype(str), return_inverse=True)
    for code, name in enumerate(names.tolist()):
        yield name, np.flatnonzero(inverse == code)


def _concat_examples(parts: list[Examples]) -> Examples:
    return Examples(
        np.concatenate([p.ids for p in parts]),
        np.concatenate([p.domains for p in parts]),
        np.concatenate([p.docs for p in parts]),
        {name: np.concatenate([p.fields[name] for p in parts]) for name in parts[0].fields},
    )


class _Ledger:
    """Per unit: hashes of its id and text, its number and role, in sorted runs on disk
    (``LEDGER_RUN_ROWS`` units per run, 8 + 8 + 8 + 4 bytes each while in memory)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.runs = 0
        self._reset()

    def _reset(self) -> None:
        self.ids, self.texts = array.array("Q"), array.array("Q")
        self.units, self.roles = array.array("q"), array.array("i")

    def add(self, doc: str, digest: bytes, unit_no: int, role: int) -> None:
        self.ids.append(id_hash(doc))
        self.texts.append(int.from_bytes(digest[:8], "little") if digest else 0)
        self.units.append(unit_no)
        self.roles.append(role)
        if len(self.ids) >= LEDGER_RUN_ROWS:
            self.flush()

    def flush(self) -> None:
        if not len(self.ids):
            return
        run = np.zeros(len(self.ids), dtype=LEDGER_DTYPE)
        run["id"], run["text"] = (
            np.frombuffer(self.ids, np.uint64),
            np.frombuffer(self.texts, np.uint64),
        )
        run["unit"], run["role"] = (
            np.frombuffer(self.units, np.int64),
            np.frombuffer(self.roles, np.int32),
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        np.save(
            self.folder / f"run-{self.runs:05d}.npy",
            np.sort(run, order=["id", "unit"]),
            allow_pickle=False,
        )
        self.runs += 1
        self._reset()


def id_hash(doc: str) -> int:
    return int.from_bytes(hashlib.blake2b(doc.encode(), digest_size=8).digest(), "little")


class _Reserve:
    """On-disk copies of each held-out domain's two extreme units: the kept unit with the
    smallest holdout key (``low``) and the held unit with the largest (``high``). When the
    hash holds out none, or all, of a domain's units, the final step moves the global ``low``
    to the task, or the global ``high`` back to the corpus, from these copies: the guarantee
    "at least one unit held out, never all" without holding anything in memory. The running
    extreme of a random stream changes O(log n) times, so few copies are ever written."""

    def __init__(self, folder: Path, plan: Plan) -> None:
        self.folder, self.plan = folder, plan
        self.best: dict[str, dict[str, list]] = {d: {} for d in plan.holdout}

    def writer(self, domain: str, held: bool, hkey: int, unit_no: int) -> PartWriter | None:
        slot = "high" if held else "low"
        current = self.best[domain].get(slot)
        rank = (hkey, unit_no)
        if current is not None:
            if (slot == "low" and rank >= tuple(current[:2])) or (
                slot == "high" and rank <= tuple(current[:2])
            ):
                return None
        name = f"{domain}.{slot}.{unit_no}"
        return PartWriter(self.folder / name, 1 << 62, self.plan.row_group_rows)

    def keep(self, domain: str, held: bool, hkey: int, unit_no: int, doc: str, writer) -> None:
        writer.close()
        slot = "high" if held else "low"
        previous = self.best[domain].get(slot)
        if previous is not None:
            shutil.rmtree(self.folder / previous[3], ignore_errors=True)
        self.best[domain][slot] = [hkey, unit_no, doc, writer.folder.name]


class _Batch:
    """Rows of consecutive units (up to a row group) gathered so that ids, keys and the split
    into corpus and tasks are computed once per batch of rows instead of once per unit (most
    units are a handful of rows). Flushed before any unit that takes the slow path, so every
    sink still receives its rows in id order."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._clear()

    def _clear(self) -> None:
        self.blocks: list[dict[str, np.ndarray]] = []
        self.meta: list[
            tuple
        ] = []  # (first id, first position in unit, domain, doc, unit_no, held)
        self.rows = 0

    def add(self, block, first_id, first, domain, doc, name, unit_no, held) -> None:
        self.blocks.append(block)
        self.meta.append((first_id, first, domain, doc, name, unit_no, held))
        self.rows += len(next(iter(block.values())))

    def flush(self, corpus: _RowSink, held_sinks: dict[str, _RowSink]) -> None:
        if not self.blocks:
            return
        counts = np.array([len(next(iter(b.values()))) for b in self.blocks], dtype=np.int64)
        first_ids, firsts, domains, docs, names, unit_nos, held = zip(*self.meta, strict=True)
        within = np.arange(self.rows, dtype=np.int64) - np.repeat(
            np.cumsum(counts) - counts, counts
        )
        bases = np.array([unit_key(self.plan.seed, "rows", n) for n in names], dtype=np.uint64)
        rows = Examples(
            np.repeat(np.array(first_ids, dtype=np.int64), counts) + within,
            np.repeat(np.array(domains, dtype=object), counts),
            np.repeat(np.array(docs, dtype=object), counts),
            {name: np.concatenate([b[name] for b in self.blocks]) for name in self.blocks[0]},
        )
        keys = {
            "_unit_key": np.zeros(self.rows, dtype=np.uint64),
            "_unit_no": np.repeat(np.array(unit_nos, dtype=np.int64), counts),
            "_row_key": mix_rows(
                np.repeat(bases, counts), np.repeat(np.array(firsts, np.int64), counts) + within
            ),
        }
        is_held = np.repeat(np.array(held, dtype=bool), counts)
        for sink, mask in [(corpus, ~is_held)] + [
            (sink, is_held & (rows.domains == domain)) for domain, sink in held_sinks.items()
        ]:
            if mask.any():
                members = np.flatnonzero(mask)
                sink.add(rows.take(members), {n: v[members] for n, v in keys.items()})
        self._clear()


def _stream(plan: Plan, shard: ShardSpec, folder: Path, progress: bool) -> dict:
    owned = plan.owned(shard)
    unit_capped = plan.unit_cap > 0
    corpus = _RowSink(
        folder / "corpus", plan, keyed=plan.keyed_corpus, cap=0 if unit_capped else plan.row_cap
    )
    held = {
        domain: _RowSink(
            folder / "held" / domain, plan, keyed=True, cap=0 if unit_capped else plan.task_cap
        )
        for domain in plan.holdout
    }
    units_sample = BottomK(plan.unit_cap) if unit_capped else None
    reserve = _Reserve(folder / "reserve", plan)
    ledger = _Ledger(folder / "ledger")
    batch = _Batch(plan)
    units: dict[str, int] = {}
    held_units: dict[str, int] = {}
    role_of = {domain: index for index, domain in enumerate(plan.holdout)}
    limit = plan.fraction * UINT64_SPAN
    bar = tqdm(
        total=sum(plan.sources[i].size for i in owned),
        unit="B",
        unit_scale=True,
        desc=f"prepare {shard}",
        disable=True if not progress else None,  # None: only on a terminal, not in job logs
    )
    for input_no in owned:
        source = plan.sources[input_no]
        next_row = 0
        for unit_index, unit in enumerate(source.units()):
            unit_no = (input_no << ROW_BITS) | unit_index
            if unit.skip:
                ledger.add(unit.doc, b"", unit_no, SKIPPED_ROLE)
                continue
            domain = unit.domain
            hkey = unit_key(plan.seed, "holdout", unit.name) if domain in role_of else 0
            take_out = domain in role_of and hkey < limit
            units[domain] = units.get(domain, 0) + 1
            held_units[domain] = held_units.get(domain, 0) + take_out
            ukey = unit_key(plan.seed, "unit-cap", unit.name) if unit_capped else 0
            copy = None
            if domain in role_of and not unit_capped:
                copy = reserve.writer(domain, take_out, hkey, unit_no)
            fast = copy is None and not unit_capped
            if not fast:
                batch.flush(corpus, held)
            pieces = []
            first = 0
            for block in unit.blocks:
                count = len(next(iter(block.values())))
                if not count:
                    continue
                if next_row + count > 1 << ROW_BITS:
                    raise InputError(
                        f"{source.name}: more than 2**32 rows from one input; split it"
                    )
                if fast:
                    first_id = (input_no << ROW_BITS) + next_row
                    batch.add(
                        block, first_id, first, domain, unit.doc, unit.name, unit_no, take_out
                    )
                    next_row += count
                    first += count
                    if batch.rows >= plan.row_group_rows:
                        batch.flush(corpus, held)
                    continue
                ids = (input_no << ROW_BITS) + next_row + np.arange(count, dtype=np.int64)
                rows = Examples(
                    ids,
                    np.full(count, domain, dtype=object),
                    np.full(count, unit.doc, dtype=object),
                    block,
                )
                keys = {
                    "_unit_key": np.full(count, ukey, dtype=np.uint64),
                    "_unit_no": np.full(count, unit_no, dtype=np.int64),
                    "_row_key": row_keys(plan.seed, unit.name, first, count),
                }
                next_row += count
                first += count
                if copy is not None:
                    copy.write(rows, keys)
                if unit_capped:
                    pieces.append((rows, keys))
                else:
                    (held[domain] if take_out else corpus).add(rows, keys)
            if copy is not None:
                reserve.keep(domain, take_out, hkey, unit_no, unit.doc, copy)
            ledger.add(unit.doc, unit.digest, unit_no, role_of[domain] if take_out else CORPUS_ROLE)
            if units_sample is not None:
                units_sample.add(
                    domain,
                    np.array([ukey], dtype=np.uint64),
                    np.array([unit_no], dtype=np.int64),
                    [(unit_no, take_out, hkey, unit.doc, pieces)],
                )
        bar.update(source.size)
    batch.flush(corpus, held)
    bar.close()
    stats: dict = {"units": units, "held": held_units, "reserve": reserve.best}
    if units_sample is not None:
        _write_unit_sample(units_sample, folder / "units.parquet", corpus, held)
    stats["corpus_parts"] = [p.name for p in corpus.close()]
    stats["corpus_rows"] = corpus.rows
    stats["max_label"] = corpus.max_label
    for sink in held.values():
        sink.close()
    ledger.flush()
    return stats


def _write_unit_sample(sample: BottomK, path: Path, corpus: _RowSink, held: dict) -> None:
    """Write the shard's bottom-k units' rows (in unit order) and their table (for the final
    step's global choice, and its holdout guarantee)."""
    survivors = sorted(
        (entry for group in sample.items().values() for e in group for entry in e[2]),
        key=lambda item: item[0],
    )
    columns: dict[str, list] = {
        "domain": [], "unit_key": [], "unit_no": [], "held": [], "holdout_key": [], "doc": []
    }  # fmt: skip
    for _, take_out, _, _, pieces in survivors:
        for rows, keys in pieces:
            (held[str(rows.domains[0])] if take_out else corpus).add(rows, keys)
    for group, entries in sample.items().items():
        for keys, _, payload in entries:
            for key, (unit_no, take_out, hkey, doc, _) in zip(keys, payload, strict=True):
                for name, value in zip(
                    columns, (group, int(key), unit_no, take_out, hkey, doc), strict=True
                ):
                    columns[name].append(value)
    types = {
        "domain": pa.string(), "unit_key": pa.uint64(), "unit_no": pa.int64(),
        "held": pa.bool_(), "holdout_key": pa.uint64(), "doc": pa.string(),
    }  # fmt: skip
    pq.write_table(pa.table({n: pa.array(v, types[n]) for n, v in columns.items()}), path)


# ---------------------------------------------------------------- the final step


@dataclass
class Merged:
    """What the final step built beside the run: corpus and tasks folders, and their facts."""

    corpus_rows: int
    domains: dict[str, int]
    tasks: dict[str, int]
    extra: dict


def shards_done(plan: Plan, count: int) -> list[dict] | None:
    """Every shard's stats when all ``count`` shards are done, else None."""
    stats = []
    for index in range(count):
        path = plan.shard_dir(ShardSpec(index, count)) / DONE
        if not path.is_file():
            return None
        stats.append(json.loads(path.read_text(encoding="utf-8")))
    return stats


def missing_shards(plan: Plan, count: int) -> list[int]:
    return [
        index
        for index in range(count)
        if not (plan.shard_dir(ShardSpec(index, count)) / DONE).is_file()
    ]


def merge(plan: Plan, count: int, stats: list[dict], corpus_tmp: Path, tasks_tmp: Path) -> Merged:
    """The final step: checks over the whole input, the caps' global choice, the holdout
    guarantee, and the corpus and task folders built at ``corpus_tmp``/``tasks_tmp`` (hard
    links where a part is kept as written; nothing is moved out of the staging folder, so a
    killed final step just runs again)."""
    shard_dirs = [plan.shard_dir(ShardSpec(index, count)) for index in range(count)]
    _check_duplicates(plan, shard_dirs)
    units, held = _totals(stats)
    unit_limit: dict[str, tuple[int, int] | None] = {}
    unit_table = None
    if plan.unit_cap > 0:
        units, held, unit_limit, unit_table = _unit_thresholds(plan, shard_dirs)
    if not units:
        what = "no non-empty documents found" if plan.kind == "tokens" else "no images found"
        raise InputError(f"{', '.join(plan.patterns) or 'the inputs'}: {what}")
    for domain in plan.holdout:
        check_holdout(domain, units.get(domain, 0), list(units), plan.noun)
    moves = _holdout_moves(plan, shard_dirs, stats, units, held, unit_table)
    corpus_parts = [p for d in shard_dirs for p in sorted((d / "corpus").glob("part-*.parquet"))]
    to_corpus = [m for m in moves if not m.to_task]
    corpus_rows = _Rows(
        corpus_parts,
        keyed=plan.keyed_corpus,
        drop={m.doc for m in moves if m.to_task},
        extra=_concat_moves(to_corpus),
    )
    rows, domains, max_label = _build_corpus(
        plan, stats, corpus_rows, corpus_tmp, unit_limit, moves
    )
    if rows == 0:
        raise InputError(
            "prepare: the inputs give no sequences (documents shorter than 16 bytes?)"
            if plan.kind == "tokens"
            else "prepare: the corpus has no images left after holding out the tasks"
        )
    tasks_tmp.mkdir(parents=True, exist_ok=True)
    sources: dict[str, _Rows] = {}
    for domain in plan.holdout:
        parts = [
            p for d in shard_dirs for p in sorted((d / "held" / domain).glob("part-*.parquet"))
        ]
        moved_in = [m for m in moves if m.to_task and m.domain == domain]
        moved_out = {m.doc for m in moves if not m.to_task and m.domain == domain}
        sources[domain] = _Rows(parts, True, moved_out, _concat_moves(moved_in))
    task_digests: dict[str, list[bytes]] = {}
    for name, group in plan.task_sources.items():
        folder = plan.staging / "task-files" / name
        parts, task_digests[name] = _spill_task_files(plan, group, folder)
        sources[name] = _Rows(parts, True)
    task_rows: dict[str, int] = {}
    task_max_label: dict[str, int] = {}
    for name in sorted(sources):
        limit = unit_limit if name in plan.holdout else {}
        task_rows[name], task_max_label[name] = _write_task(
            plan, sources[name], tasks_tmp / f"{name}.parquet", limit
        )
        if task_rows[name] == 0:
            raise InputError(
                f"prepare: task {name!r} has no sequences (its documents are too short)"
            )
    extra = dict(plan.manifest_extra)
    if plan.kind == "image":
        num_classes = max_label + 1
        for name in sorted(task_max_label):
            if task_max_label[name] >= num_classes:
                raise InputError(
                    f"task {name!r} has label {task_max_label[name]} but the corpus only has labels "
                    f"0..{num_classes - 1}; a classifier trained on the corpus cannot predict it"
                )
        extra["num_classes"] = num_classes
    if plan.kind == "tokens":
        _warn_leakage(plan, shard_dirs, task_digests)
    if moves:
        extra["holdout_moved"] = {m.doc: ("task" if m.to_task else "corpus") for m in moves}
    return Merged(rows, domains, task_rows, extra)


def _totals(stats: list[dict]) -> tuple[dict[str, int], dict[str, int]]:
    units: dict[str, int] = {}
    held: dict[str, int] = {}
    for shard in stats:
        for domain, count in shard["units"].items():
            units[domain] = units.get(domain, 0) + count
        for domain, count in shard["held"].items():
            held[domain] = held.get(domain, 0) + count
    return units, held


def _unit_thresholds(plan: Plan, shard_dirs: list[Path]):
    """Per domain, the global bottom-k units (``max_docs_per_domain``); the units and held-out
    units each domain keeps; and the table of the kept units."""
    tables = [
        read_table(d / "units.parquet") for d in shard_dirs if (d / "units.parquet").is_file()
    ]
    if not tables:
        return {}, {}, {}, None
    table = pa.concat_tables(tables)
    domains = np.array(table.column("domain").to_pylist(), dtype=object)
    keys = table.column("unit_key").to_numpy()
    ties = table.column("unit_no").to_numpy()
    held_flags = table.column("held").to_numpy(zero_copy_only=False)
    kept = np.zeros(len(keys), dtype=bool)
    units, held, limits = {}, {}, {}
    for domain in sorted(set(domains.tolist())):
        mask = domains == domain
        limits[domain] = threshold(keys[mask], ties[mask], plan.unit_cap)
        kept[mask] = at_most(keys[mask], ties[mask], limits[domain])
        units[domain] = int(kept[mask].sum())
        held[domain] = int((kept & mask & held_flags).sum())
    return units, held, limits, table.filter(pa.array(kept))


@dataclass
class _Move:
    """A unit moved by the holdout guarantee: to its domain's task, or back to the corpus."""

    domain: str
    doc: str
    to_task: bool
    rows: Examples
    keys: dict[str, np.ndarray]


def _holdout_moves(plan, shard_dirs, stats, units, held, unit_table) -> list[_Move]:
    """When the hash held out none of a domain's units, its kept unit with the smallest
    holdout key goes to the task; when it held out all, the held unit with the largest key
    stays in the corpus. The same unit whatever the sharding (keys are global)."""
    moves = []
    for domain in plan.holdout:
        if held.get(domain, 0) not in (0, units[domain]):
            continue
        to_task = held.get(domain, 0) == 0
        slot = "low" if to_task else "high"
        if unit_table is not None:  # unit cap: every surviving unit's rows are in the staging
            rows = unit_table.filter(
                pa.compute.and_(
                    pa.compute.equal(unit_table.column("domain"), domain),
                    pa.compute.equal(unit_table.column("held"), not to_task),
                )
            )
            order = np.lexsort(
                (rows.column("unit_no").to_numpy(), rows.column("holdout_key").to_numpy())
            )
            doc = rows.column("doc")[int(order[0] if to_task else order[-1])].as_py()
            folder = "corpus" if to_task else f"held/{domain}"
            parts = [p for d in shard_dirs for p in sorted((d / folder).glob("part-*.parquet"))]
        else:
            found = [
                (entry, d)
                for shard, d in zip(stats, shard_dirs, strict=True)
                if (entry := shard["reserve"].get(domain, {}).get(slot)) is not None
            ]
            entry, shard_dir = (min if to_task else max)(found, key=lambda e: (e[0][0], e[0][1]))
            doc = entry[2]
            parts = sorted((shard_dir / "reserve" / entry[3]).glob("part-*.parquet"))
        rows, keys = _unit_rows(parts, doc)
        moves.append(_Move(domain, doc, to_task, rows, keys))
    return moves


def _unit_rows(parts: list[Path], doc: str) -> tuple[Examples, dict[str, np.ndarray]]:
    """The rows (and keys) of the unit ``doc`` in keyed staging parts."""
    found = []
    for path in parts:
        table = read_table(path)
        table = table.filter(pa.compute.equal(table.column("doc"), doc))
        if table.num_rows:
            found.append(table)
    table = pa.concat_tables(found)
    keys = {name: table.column(name).to_numpy() for name in KEY_COLUMNS}
    return _table_to_examples(table.drop_columns(list(KEY_COLUMNS)), parts[0]), keys


def _concat_moves(moves: list[_Move]) -> tuple[Examples, dict[str, np.ndarray]] | None:
    if not moves:
        return None
    rows = _concat_examples([m.rows for m in moves])
    keys = {name: np.concatenate([m.keys[name] for m in moves]) for name in KEY_COLUMNS}
    order = np.argsort(rows.ids, kind="stable")
    return rows.take(order), {name: v[order] for name, v in keys.items()}


@dataclass
class _Rows:
    """The rows of one output: staging parts (in id order), minus the units in ``drop``,
    plus ``extra`` rows (moved units, with their keys) merged in by id."""

    parts: list[Path]
    keyed: bool
    drop: set[str] = field(default_factory=set)
    extra: tuple[Examples, dict[str, np.ndarray]] | None = None


def _key_columns(rows: _Rows) -> dict[str, np.ndarray]:
    """``domain``, ``id`` and the key columns of every row of a keyed ``_Rows``."""
    out: dict[str, list[np.ndarray]] = {c: [] for c in ("domain", "id", "doc", *KEY_COLUMNS)}
    for path in rows.parts:
        table = read_table(path, columns=list(out))
        for name in out:
            column = table.column(name)
            values = column.to_numpy() if name not in ("domain", "doc") else column.to_pylist()
            out[name].append(
                np.asarray(values, dtype=object if name in ("domain", "doc") else None)
            )
    if rows.extra is not None:
        examples, keys = rows.extra
        for name, values in (
            ("domain", examples.domains),
            ("id", examples.ids),
            ("doc", examples.docs),
            *keys.items(),
        ):
            out[name].append(np.asarray(values))
    merged = {
        name: np.concatenate(parts) if parts else np.zeros(0, dtype=object)
        for name, parts in out.items()
    }
    if rows.drop:
        keep = ~np.isin(merged["doc"], list(rows.drop))
        merged = {name: values[keep] for name, values in merged.items()}
    return merged


def _unit_ok(keys: dict[str, np.ndarray], unit_limit: dict) -> np.ndarray:
    ok = np.ones(len(keys["id"]), dtype=bool)
    for domain, limit in unit_limit.items():
        mask = keys["domain"] == domain
        ok[mask] = at_most(
            keys["_unit_key"][mask].astype(np.uint64),
            keys["_unit_no"][mask].astype(np.int64),
            limit,
        )
    return ok


def _row_limits(rows: _Rows, unit_limit: dict, cap: int, by_domain: bool) -> dict:
    """The row threshold of a cap per domain (or over all rows when ``by_domain`` is False),
    among the rows whose units survived the unit cap."""
    if cap <= 0:
        return {}
    keys = _key_columns(rows)
    ok = _unit_ok(keys, unit_limit)
    groups = keys["domain"] if by_domain else np.full(len(keys["id"]), "", dtype=object)
    limits = {}
    for group in sorted(set(groups[ok].tolist())):
        mask = ok & (groups == group)
        row_key = keys["_row_key"][mask].astype(np.uint64)
        limits[group] = threshold(row_key, keys["id"][mask].astype(np.int64), cap)
    return limits


def _keep(
    keys: dict[str, np.ndarray], unit_limit: dict, row_limit: dict, by_domain: bool
) -> np.ndarray:
    keep = _unit_ok(keys, unit_limit)
    groups = keys["domain"] if by_domain else np.full(len(keep), "", dtype=object)
    for group, limit in row_limit.items():
        mask = groups == group
        keep[mask] &= at_most(
            keys["_row_key"][mask].astype(np.uint64), keys["id"][mask].astype(np.int64), limit
        )
    return keep


def _blocks(rows: _Rows, unit_limit: dict, row_limit: dict, by_domain: bool) -> Iterator[Examples]:
    """The kept rows of ``rows`` in id order, one row group at a time, key columns dropped."""
    extra, extra_keys = rows.extra if rows.extra is not None else (None, None)
    if extra is not None and rows.keyed:
        extra_cols = {"domain": extra.domains, "id": extra.ids, "doc": extra.docs, **extra_keys}
        extra = extra.take(np.flatnonzero(_keep(extra_cols, unit_limit, row_limit, by_domain)))
    pending = 0  # extra rows emitted so far
    for path in rows.parts:
        handle = parquet_file(path)
        for group in range(handle.metadata.num_row_groups):
            table = handle.read_row_group(group)
            keep = np.ones(table.num_rows, dtype=bool)
            if rows.keyed:
                cols = {
                    "domain": np.array(table.column("domain").to_pylist(), dtype=object),
                    "id": table.column("id").to_numpy(),
                    **{name: table.column(name).to_numpy() for name in KEY_COLUMNS},
                }
                keep &= _keep(cols, unit_limit, row_limit, by_domain)
                table = table.drop_columns(list(KEY_COLUMNS))
            if rows.drop:
                docs = np.array(table.column("doc").to_pylist(), dtype=object)
                keep &= ~np.isin(docs, list(rows.drop))
            table = table.filter(pa.array(keep)).replace_schema_metadata(
                handle.schema_arrow.metadata
            )
            block = _table_to_examples(table, path)
            if extra is not None and len(block):
                upto = int(np.searchsorted(extra.ids, block.ids.max(), side="right"))
                if upto > pending:
                    block = _concat_examples([block, extra.take(np.arange(pending, upto))])
                    block = block.take(np.argsort(block.ids, kind="stable"))
                    pending = upto
            if len(block):
                yield block
    if extra is not None and pending < len(extra):
        yield extra.take(np.arange(pending, len(extra)))


def _build_corpus(
    plan: Plan, stats: list[dict], rows: _Rows, corpus_tmp: Path, unit_limit: dict, moves
) -> tuple[int, dict[str, int], int]:
    """The corpus folder at ``corpus_tmp``; returns (rows, rows per domain, largest label)."""
    corpus_tmp.mkdir(parents=True, exist_ok=True)
    if not rows.keyed:  # no cap: every part is kept as written (hard links), but for the few
        return _link_corpus(plan, stats, rows, corpus_tmp, moves)  # a holdout move touched
    row_limit = _row_limits(rows, unit_limit, plan.row_cap, by_domain=True)
    writer = PartWriter(corpus_tmp, plan.shard_rows, plan.row_group_rows)
    domains: dict[str, int] = {}
    max_label = -1
    for block in _blocks(rows, unit_limit, row_limit, by_domain=True):
        writer.write(block)
        _count(domains, block)
        if "label" in block.fields:
            max_label = max(max_label, int(block.fields["label"].max()))
    writer.close()
    return writer.rows_written, dict(sorted(domains.items())), max_label


def _count(domains: dict[str, int], block: Examples) -> None:
    names, counts = np.unique(block.domains.astype(str), return_counts=True)
    for name, count in zip(names.tolist(), counts.tolist(), strict=True):
        domains[name] = domains.get(name, 0) + count


def _link_corpus(
    plan: Plan, stats: list[dict], rows: _Rows, corpus_tmp: Path, moves: list[_Move]
) -> tuple[int, dict[str, int], int]:
    """Hard-link each part in order; a part that a moved unit leaves or joins is rewritten."""
    domains: dict[str, int] = {}
    for shard in stats:
        for domain, count in shard["corpus_rows"].items():
            domains[domain] = domains.get(domain, 0) + count
    max_label = max([shard.get("max_label", -1) for shard in stats] + [-1])
    ranges = [_id_range(path) for path in rows.parts] if moves else []
    touched: dict[int, list] = {}
    for move in moves:
        lo, hi = int(move.rows.ids.min()), int(move.rows.ids.max())
        if move.to_task:  # its rows leave the parts that hold them
            for index, (first, last) in enumerate(ranges):
                if first <= hi and lo <= last:
                    touched.setdefault(index, [])
            domains[move.domain] -= len(move.rows)
        else:  # its rows join the first part whose ids reach past them (or the last part)
            index = next((i for i, (_, last) in enumerate(ranges) if last >= lo), len(ranges) - 1)
            touched.setdefault(index, []).append(move)
            domains[move.domain] = domains.get(move.domain, 0) + len(move.rows)
            if "label" in move.rows.fields:
                max_label = max(max_label, int(move.rows.fields["label"].max()))
    number = 0
    for index, path in enumerate(rows.parts):
        target = corpus_tmp / f"part-{number:05d}.parquet"
        if index not in touched:
            _link(path, target)
            number += 1
            continue
        part = _Rows([path], False, rows.drop, _concat_moves(touched[index]))
        blocks = [b for b in _blocks(part, {}, {}, True)]
        if blocks:
            merged = _concat_examples(blocks)
            writer = PartWriter(
                corpus_tmp, 1 << 62, pq.read_metadata(path).row_group(0).num_rows, number
            )
            writer.write(merged)
            writer.close()
            number += 1
    return sum(domains.values()), dict(sorted((k, v) for k, v in domains.items() if v)), max_label


def _id_range(path: Path) -> tuple[int, int]:
    ids = read_table(path, columns=["id"]).column("id").to_numpy()
    return (int(ids.min()), int(ids.max())) if len(ids) else (0, -1)


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links: copy
        shutil.copy2(src, dst)


def _spill_task_files(
    plan: Plan, sources: list[Source], folder: Path
) -> tuple[list[Path], list[bytes]]:
    """The units of a ``--task``'s files as keyed staging parts (capped by
    ``max_task_seqs``); returns them and the texts' digests. Ids must be unique in a task."""
    if folder.exists():
        shutil.rmtree(folder)
    sink = _RowSink(folder, plan, keyed=True, cap=plan.task_cap)
    seen: dict[str, str] = {}
    digests = []
    next_row = 0
    for unit in (unit for source in sources for unit in source.units()):
        if unit.doc in seen:
            raise InputError(
                f"{unit.where}: duplicate id {unit.doc!r} (first seen at {seen[unit.doc]})"
            )
        seen[unit.doc] = unit.where
        if unit.skip:
            continue
        first = 0
        for block in unit.blocks:
            count = len(next(iter(block.values())))
            if not count:
                continue
            rows = Examples(
                next_row + np.arange(count, dtype=np.int64),
                np.full(count, unit.domain, dtype=object),
                np.full(count, unit.doc, dtype=object),
                block,
            )
            keys = {
                "_unit_key": np.zeros(count, np.uint64),
                "_unit_no": np.zeros(count, np.int64),
                "_row_key": row_keys(plan.seed, unit.name, first, count),
            }
            sink.add(rows, keys)
            next_row += count
            first += count
        digests.append(unit.digest)
    return sink.close(), digests


def _write_task(plan: Plan, rows: _Rows, path: Path, unit_limit: dict) -> tuple[int, int]:
    """One task file: unit cap, then ``max_task_seqs`` over the task; ids 0..n-1."""
    row_limit = _row_limits(rows, unit_limit, plan.task_cap, by_domain=False)
    writer = PartWriter(path.parent / f".{path.stem}.parts", 1 << 62, plan.row_group_rows)
    count, max_label = 0, -1
    for block in _blocks(rows, unit_limit, row_limit, by_domain=False):
        block.ids = count + np.arange(len(block), dtype=np.int64)
        count += len(block)
        writer.write(block)
        if "label" in block.fields:
            max_label = max(max_label, int(block.fields["label"].max()))
    written = writer.close()
    if written:
        os.replace(written[0], path)
    shutil.rmtree(writer.folder, ignore_errors=True)
    return count, max_label


# ---------------------------------------------------------------- checks over the whole input


def _ledger_runs(shard_dirs: list[Path]) -> list[np.ndarray]:
    return [
        np.load(path, mmap_mode="r", allow_pickle=False)
        for d in shard_dirs
        for path in sorted((d / "ledger").glob("run-*.npy"))
    ]


BUCKET_ENTRIES = 1 << 22  # ledger entries compared at once (32 bytes each)


def _check_duplicates(plan: Plan, shard_dirs: list[Path]) -> None:
    """Duplicate unit ids anywhere in the inputs are an error naming both places.

    The ledger runs are sorted by id hash; they are compared one hash range at a time, so
    memory holds a range, not every id. A hash match is confirmed by reading the two units
    again (a 64-bit collision between different ids is not an error)."""
    runs = _ledger_runs(shard_dirs)
    total = sum(len(r) for r in runs)
    if total < 2:
        return
    buckets = max(1, -(-total // BUCKET_ENTRIES))
    edges = [int(i * (2**64) / buckets) for i in range(buckets)] + [2**64]
    suspects: list[tuple[int, int]] = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        pieces = []
        for run in runs:
            ids = run["id"]
            lo = int(np.searchsorted(ids, np.uint64(low), side="left"))
            hi = (
                len(ids)
                if high >= 2**64
                else int(np.searchsorted(ids, np.uint64(high), side="left"))
            )
            if hi > lo:
                pieces.append(np.asarray(run[lo:hi]))
        if not pieces:
            continue
        entries = np.sort(np.concatenate(pieces), order=["id", "unit"])
        same = np.flatnonzero(entries["id"][1:] == entries["id"][:-1])
        for index in same[:100]:
            suspects.append((int(entries["unit"][index + 1]), int(entries["unit"][index])))
    for second, first in sorted(suspects)[:100]:
        a, b = _locate(plan, first), _locate(plan, second)
        if a[0] == b[0]:
            raise InputError(f"{b[1]}: duplicate id {b[0]!r} (first seen at {a[1]})")


def _locate(plan: Plan, unit_no: int) -> tuple[str, str]:
    """``(id, where)`` of unit number ``unit_no``, read again from its input."""
    source = plan.sources[unit_no >> ROW_BITS]
    wanted = unit_no & ((1 << ROW_BITS) - 1)
    for index, unit in enumerate(source.units()):
        if index == wanted:
            return unit.doc, unit.where
    raise InputError(f"{source.name}: changed while prepare was running; rerun `grasp prepare`")


def _warn_leakage(plan: Plan, shard_dirs: list[Path], task_digests: dict[str, list[bytes]]) -> None:
    """Warn for task documents whose text appears verbatim among the corpus documents."""
    from grasp_cli.prepare.split import warn_verbatim_overlap

    runs = _ledger_runs(shard_dirs)
    per_task: dict[str, np.ndarray] = {}
    for role, domain in enumerate(plan.holdout):
        per_task[domain] = np.concatenate(
            [np.asarray(r["text"][r["role"] == role]) for r in runs] or [np.zeros(0, np.uint64)]
        )
    for name, digests in task_digests.items():
        per_task[name] = np.array(
            [int.from_bytes(d[:8], "little") for d in digests if d], dtype=np.uint64
        )
    wanted = np.unique(np.concatenate(list(per_task.values()) or [np.zeros(0, np.uint64)]))
    if not len(wanted):
        return
    found = []
    for run in runs:
        for start in range(0, len(run), BUCKET_ENTRIES):
            chunk = np.asarray(run[start : start + BUCKET_ENTRIES])
            texts = chunk["text"][chunk["role"] == CORPUS_ROLE]
            found.append(texts[np.isin(texts, wanted)])
    shared = np.unique(np.concatenate(found)) if found else np.zeros(0, np.uint64)
    warn_verbatim_overlap(
        {name: (int(np.isin(texts, shared).sum()), len(texts)) for name, texts in per_task.items()}
    )


def remove_staging(plan: Plan, only_if_empty: bool = False) -> None:
    """Drop the staging folder (after the commit, or after bad input over the whole), and
    ``.grasp`` if nothing else is in it. ``only_if_empty``: only when no shard left work there
    (its lock files and the image plan do not count)."""
    if only_if_empty and plan.staging.is_dir():
        if any(p.is_dir() for p in plan.staging.iterdir()):
            return
    shutil.rmtree(plan.staging, ignore_errors=True)
    try:
        plan.staging.parent.rmdir()
    except OSError:
        pass


def sweep_old_staging(plan: Plan, min_age_s: float) -> None:
    """Staging folders of other plans older than ``min_age_s`` (a younger one may belong to a
    prepare running now): what an abandoned sharded prepare left."""
    now = time.time()
    for folder in plan.staging.parent.glob("prepare-*"):
        if folder == plan.staging or not folder.is_dir():
            continue
        try:
            if now - folder.stat().st_mtime >= min_age_s:
                shutil.rmtree(folder, ignore_errors=True)
        except FileNotFoundError:
            pass
