"""The final step of ``grasp prepare``: every shard is done; build corpus and tasks from them.

``merge`` reads only the shards' staging folders (``stream.py`` describes them) and builds the
corpus and task folders beside the run, for ``stage.py`` to commit as a pair:

1. checks over the whole input: duplicate ids (from the shards' sorted ledger runs, one hash
   range at a time), empty input, held-out domains with fewer than two units;
2. the unit cap's global bottom-k per domain (from each shard's ``units.parquet``);
3. the holdout guarantee: when the hash held out none (all) of a domain's units, the one with
   the smallest (largest) key moves to the task (back to the corpus), from the shards' copies;
4. the corpus: parts hard-linked in shard order when no cap is set (a part that a moved unit
   leaves or joins is rewritten), else every candidate row filtered by the caps' global
   thresholds and written anew; rows stay in id order;
5. each task: held-out rows (or a ``--task``'s files, read now), unit cap, ``max_task_seqs``,
   ids numbered 0..n-1; image labels checked against the corpus's; leakage warned about.

Nothing is moved out of the staging folder, so a final step killed at any point just runs again.
"""

from __future__ import annotations

import mmap
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq

from grasp_cli.artifacts.examples import Examples, PartWriter, _table_to_examples
from grasp_cli.artifacts.shards import ShardSpec
from grasp_cli.artifacts.tables import parquet_file, read_table
from grasp_cli.errors import InputError
from grasp_cli.prepare.split import at_most, check_holdout, row_keys, threshold
from grasp_cli.prepare.stream import (
    CORPUS_ROLE,
    KEY_COLUMNS,
    ROW_BITS,
    Plan,
    _concat_examples,
    _RowSink,
    max_token,
)
from grasp_cli.prepare.units import Source


@dataclass
class Merged:
    """What the final step built beside the run: corpus and tasks folders, and their facts."""

    corpus_rows: int
    domains: dict[str, int]
    tasks: dict[str, int]
    extra: dict


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
    rows, domains, max_label, largest = _build_corpus(
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
        task_rows[name], task_max_label[name], task_largest = _write_task(
            plan, sources[name], tasks_tmp / f"{name}.parquet", limit
        )
        largest = max(largest, task_largest)
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
        # over corpus and tasks: exact whichever way a holdout move went (see _link_corpus)
        extra["max_token_id"] = largest
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
) -> tuple[int, dict[str, int], int, int]:
    """The corpus folder at ``corpus_tmp``; returns (rows, rows per domain, largest label,
    largest non-pad token id: that of the corpus, or of corpus and tasks together after a
    holdout move to a task)."""
    corpus_tmp.mkdir(parents=True, exist_ok=True)
    if not rows.keyed:  # no cap: every part is kept as written (hard links), but for the few
        return _link_corpus(plan, stats, rows, corpus_tmp, moves)  # a holdout move touched
    row_limit = _row_limits(rows, unit_limit, plan.row_cap, by_domain=True)
    writer = PartWriter(corpus_tmp, plan.shard_rows, plan.row_group_rows)
    domains: dict[str, int] = {}
    max_label = largest = -1
    for block in _blocks(rows, unit_limit, row_limit, by_domain=True):
        writer.write(block)
        _count(domains, block)
        if "label" in block.fields:
            max_label = max(max_label, int(block.fields["label"].max()))
        if "tokens" in block.fields:
            largest = max(largest, max_token(block, plan.pad_id))
    writer.close()
    return writer.rows_written, dict(sorted(domains.items())), max_label, largest


def _count(domains: dict[str, int], block: Examples) -> None:
    names, counts = np.unique(block.domains.astype(str), return_counts=True)
    for name, count in zip(names.tolist(), counts.tolist(), strict=True):
        domains[name] = domains.get(name, 0) + count


def _link_corpus(
    plan: Plan, stats: list[dict], rows: _Rows, corpus_tmp: Path, moves: list[_Move]
) -> tuple[int, dict[str, int], int, int]:
    """Hard-link each part in order; a part that a moved unit leaves or joins is rewritten.
    The largest token id is over the rows the shards wrote plus those moved in: the corpus's,
    or larger only by rows that moved to a task (so exact over corpus and tasks)."""
    domains: dict[str, int] = {}
    for shard in stats:
        for domain, count in shard["corpus_rows"].items():
            domains[domain] = domains.get(domain, 0) + count
    max_label = max([shard.get("max_label", -1) for shard in stats] + [-1])
    largest = max([shard.get("max_token", -1) for shard in stats] + [-1])
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
            if "tokens" in move.rows.fields:
                largest = max(largest, max_token(move.rows, plan.pad_id))
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
    kept = dict(sorted((k, v) for k, v in domains.items() if v))
    return sum(domains.values()), kept, max_label, largest


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


def _write_task(plan: Plan, rows: _Rows, path: Path, unit_limit: dict) -> tuple[int, int, int]:
    """One task file: unit cap, then ``max_task_seqs`` over the task; ids 0..n-1. Returns
    (rows, largest label, largest non-pad token id)."""
    row_limit = _row_limits(rows, unit_limit, plan.task_cap, by_domain=False)
    writer = PartWriter(path.parent / f".{path.stem}.parts", 1 << 62, plan.row_group_rows)
    count, max_label, largest = 0, -1, -1
    for block in _blocks(rows, unit_limit, row_limit, by_domain=False):
        block.ids = count + np.arange(len(block), dtype=np.int64)
        count += len(block)
        writer.write(block)
        if "label" in block.fields:
            max_label = max(max_label, int(block.fields["label"].max()))
        if "tokens" in block.fields:
            largest = max(largest, max_token(block, plan.pad_id))
    written = writer.close()
    if written:
        os.replace(written[0], path)
    shutil.rmtree(writer.folder, ignore_errors=True)
    return count, max_label, largest


# ---------------------------------------------------------------- checks over the whole input


class LedgerRun:
    """One ledger run (a ``.npy`` of ``LEDGER_DTYPE`` entries) mapped read-only.

    Pages of a file mapping stay in the process's resident set for as long as they are
    mapped, so a pass over every run would leave the whole ledger (32 bytes a document)
    counted against the job; ``release()`` drops the pages read so far (the file stays
    mapped, later reads fault them back in)."""

    def __init__(self, path: Path) -> None:
        from grasp_cli.artifacts.examples import read_npy_header

        with open(path, "rb") as handle:
            shape, fortran, dtype, offset = read_npy_header(handle)
            if fortran or len(shape) != 1 or dtype.hasobject:
                raise InputError(f"{path}: not a prepare ledger run")
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self.entries = np.frombuffer(self._map, dtype=dtype, count=shape[0], offset=offset)

    def __len__(self) -> int:
        return len(self.entries)

    def release(self) -> None:
        if hasattr(self._map, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)


def _ledger_runs(shard_dirs: list[Path]) -> list[LedgerRun]:
    return [
        LedgerRun(path) for d in shard_dirs for path in sorted((d / "ledger").glob("run-*.npy"))
    ]


BUCKET_ENTRIES = 1 << 16  # ledger entries compared or scanned at once (32 bytes each: 2 MiB)


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
        for ledger in runs:
            run = ledger.entries
            ids = run["id"]
            lo = int(np.searchsorted(ids, np.uint64(low), side="left"))
            hi = (
                len(ids)
                if high >= 2**64
                else int(np.searchsorted(ids, np.uint64(high), side="left"))
            )
            if hi > lo:
                pieces.append(np.array(run[lo:hi]))
            ledger.release()
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

    def chunks():  # every run in chunks of BUCKET_ENTRIES, copied, pages released
        for ledger in runs:
            for start in range(0, len(ledger), BUCKET_ENTRIES):
                yield np.array(ledger.entries[start : start + BUCKET_ENTRIES])
                ledger.release()

    held_out: dict[int, list[np.ndarray]] = {role: [] for role in range(len(plan.holdout))}
    for chunk in chunks():
        for role, texts in held_out.items():
            texts.append(chunk["text"][chunk["role"] == role])
    per_task: dict[str, np.ndarray] = {}
    for role, domain in enumerate(plan.holdout):
        per_task[domain] = np.concatenate(held_out[role] or [np.zeros(0, np.uint64)])
    for name, digests in task_digests.items():
        per_task[name] = np.array(
            [int.from_bytes(d[:8], "little") for d in digests if d], dtype=np.uint64
        )
    wanted = np.unique(np.concatenate(list(per_task.values()) or [np.zeros(0, np.uint64)]))
    if not len(wanted):
        return
    found = []
    for chunk in chunks():
        texts = chunk["text"][chunk["role"] == CORPUS_ROLE]
        found.append(texts[np.isin(texts, wanted)])
    shared = np.unique(np.concatenate(found)) if found else np.zeros(0, np.uint64)
    warn_verbatim_overlap(
        {name: (int(np.isin(texts, shared).sum()), len(texts)) for name, texts in per_task.items()}
    )
