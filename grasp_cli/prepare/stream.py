"""The streaming, shardable core of ``grasp prepare``: one shard's pass over its inputs.

Shard ``i`` of ``n`` (``--shard/--num-shards`` or a SLURM array) owns a contiguous run of the
input files (balanced by bytes) and streams them one unit at a time into a staging folder
``RUN/_grasp/prepare-<plan key>/shard-IIIII-of-NNNNN/``:

- ``corpus/part-*.parquet``: corpus rows, written as parts fill (with key columns
  ``_unit_key``, ``_unit_no``, ``_row_key`` when a cap needs a final choice);
- ``held/<domain>/part-*.parquet``: rows of held-out units, with their keys;
- ``reserve/``: copies of each held-out domain's extreme units (see ``_Reserve``);
- ``units.parquet``: with ``max_docs_per_domain``, the shard's bottom-k units per domain;
- ``ledger/run-*.npy``: per unit, hashes of its id and text (duplicate ids, leakage);
- ``done.json``: written last; a shard with it is finished, and a rerun skips it.

A shard holds a batch of rows (one row group), one row group per writer, and what the caps
keep (at most ``2 * cap`` rows or units per domain): memory is bounded by the caps, not by
the corpus. The shard that finds every shard done runs the final step (``merge.py``). Row ids
are ``input number * 2**32 + row number within that input``: unique, and the same whatever
the number of shards. A killed shard loses only its own folder; its rerun starts it again.
"""

from __future__ import annotations

import array
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq

from grasp_cli.artifacts.atomic import atomic_write_text, creation_lock, writing
from grasp_cli.artifacts.examples import BYTE_PAD_ID, Examples, PartWriter
from grasp_cli.artifacts.shards import ShardSpec
from grasp_cli.errors import InputError
from grasp_cli.prepare.split import (
    DOCUMENTS,
    UINT64_SPAN,
    BottomK,
    Noun,
    mix_rows,
    row_keys,
    unit_key,
)
from grasp_cli.prepare.units import Source
from grasp_cli.progress import Progress

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
    def pad_id(self) -> int:
        """The id that fills short token rows (the token space's, else the byte pad 256)."""
        return int(self.manifest_extra.get("pad_id", BYTE_PAD_ID))

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
        self.pad_id = plan.pad_id
        self.max_token = -1  # the largest non-pad token id written

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
        if "tokens" in rows.fields:
            self.max_token = max(self.max_token, max_token(rows, self.pad_id))

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


def max_token(rows: Examples, pad_id: int) -> int:
    """The largest token id of ``rows`` other than ``pad_id`` (-1 if none)."""
    tokens = rows.fields["tokens"]
    real = tokens[tokens != pad_id]
    return int(real.max()) if real.size else -1


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
    bar = Progress(
        sum(plan.sources[i].size for i in owned),
        f"prepare {shard}",
        unit="bytes",
        enabled=progress,
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
    stats["max_token"] = corpus.max_token
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


def remove_staging(plan: Plan, only_if_empty: bool = False) -> None:
    """Drop the staging folder (after the commit, or after bad input over the whole), and
    ``_grasp`` if nothing else is in it. ``only_if_empty``: only when no shard left work there
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
