"""Corpus and task shards: the ``examples`` schema every stage reads, and how stages read it.

Text:   id int64, domain string, doc string, tokens list<int32>   (seq_len + 1 tokens per row),
        and for tokenized corpora offset int64 (the row's first token's position in its document)
Images: id int64, domain string, doc string, image binary (uint8, C-order), label int64;
        the image shape is stored in the schema metadata key ``grasp.image_shape``.

Stages never load a whole corpus. ``open_corpus`` gives ids and domains as columns, rows by
row group (``iter_blocks``, ``iter_rows``), and a row store for random access in training
(``Corpus.to_torch``); ``PartWriter`` writes rows as they come. ``read_examples`` (everything
in memory) is for tasks, exports and tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from grasp_cli.artifacts.atomic import _tmp_name, atomic_dir, creation_lock, sweep_debris
from grasp_cli.artifacts.layout import MANIFEST_NAME, SCRATCH
from grasp_cli.artifacts.tables import (
    parquet_file,
    read_table,
    require_columns,
    unreadable_parquet,
    write_table,
)
from grasp_cli.errors import InputError

if TYPE_CHECKING:
    import torch

IMAGE_SHAPE_KEY = b"grasp.image_shape"
METADATA_FIELDS = ("offset",)  # fields that locate a row, not model inputs
# grasp's byte corpus (the default; a manifest without pad_id / vocab_size means it): UTF-8
# bytes 0-255 are the tokens, 256 pads. models.transformer builds its vocabulary from these.
BYTE_PAD_ID = 256
BYTE_VOCAB_SIZE = 257


@dataclass
class Examples:
    """Rows of a corpus or task, in memory. ``fields`` holds 'tokens' (and, for a tokenized
    corpus, 'offset': int64 [N], where each row starts in its document, in tokens) or
    'image' + 'label'. 'offset' locates a row; it is never a model input."""

    ids: np.ndarray  # int64 [N]
    domains: np.ndarray  # object (str) [N]
    docs: np.ndarray  # object (str) [N]
    fields: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def is_image(self) -> bool:
        return "image" in self.fields

    def to_torch(self) -> dict[str, torch.Tensor]:
        """Tensors for training: tokens/labels as int64, images kept as uint8."""
        import torch  # only training needs it: the storage layer itself never imports torch

        out = {}
        for name, values in self.fields.items():
            if name in METADATA_FIELDS:
                continue
            tensor = torch.from_numpy(np.ascontiguousarray(values))
            out[name] = tensor if name == "image" else tensor.long()
        return out

    def take(self, rows: np.ndarray) -> Examples:
        return Examples(
            self.ids[rows],
            self.domains[rows],
            self.docs[rows],
            {k: v[rows] for k, v in self.fields.items()},
        )

    def domain_codes(self) -> tuple[np.ndarray, list[str]]:
        names = sorted(set(self.domains.tolist()))
        lookup = {name: code for code, name in enumerate(names)}
        return np.array([lookup[d] for d in self.domains], dtype=np.int32), names

    def row_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of one row of each field: ``{"tokens": (W,)}`` or ``{"image": (H, W[, C]), "label": ()}``."""
        return {
            name: tuple(values.shape[1:])
            for name, values in self.fields.items()
            if name not in METADATA_FIELDS
        }

    def num_classes(self) -> int:
        """Largest label + 1 (image corpora)."""
        return int(self.fields["label"].max()) + 1


def examples_to_table(examples: Examples) -> pa.Table:
    columns = {
        "id": pa.array(examples.ids, pa.int64()),
        "domain": pa.array(examples.domains.astype(str).tolist(), pa.string()),
        "doc": pa.array(examples.docs.astype(str).tolist(), pa.string()),
    }
    metadata = {}
    if "tokens" in examples.fields:
        tokens = np.asarray(examples.fields["tokens"], dtype=np.int32)
        flat = pa.array(tokens.reshape(-1), pa.int32())
        columns["tokens"] = pa.FixedSizeListArray.from_arrays(flat, tokens.shape[1]).cast(
            pa.list_(pa.int32())
        )
        if "offset" in examples.fields:
            columns["offset"] = pa.array(
                np.asarray(examples.fields["offset"], np.int64), pa.int64()
            )
    if "image" in examples.fields:
        images = np.ascontiguousarray(examples.fields["image"], dtype=np.uint8)
        row_bytes = int(np.prod(images.shape[1:]))
        columns["image"] = pa.array(
            [images[i].tobytes() for i in range(len(images))], pa.binary(row_bytes)
        )
        columns["label"] = pa.array(
            np.asarray(examples.fields["label"], dtype=np.int64), pa.int64()
        )
        metadata[IMAGE_SHAPE_KEY] = json.dumps(list(images.shape[1:])).encode()
    table = pa.table(columns)
    return table.replace_schema_metadata(metadata or None)


def write_examples(
    folder: Path, examples: Examples, shard_rows: int, row_group_rows: int
) -> list[Path]:
    """Write ``examples`` as ``folder/part-NNNNN.parquet`` shards (each written atomically)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for part, start in enumerate(range(0, max(len(examples), 1), shard_rows)):
        rows = np.arange(start, min(start + shard_rows, len(examples)))
        path = folder / f"part-{part:05d}.parquet"
        write_table(path, examples_to_table(examples.take(rows)), row_group_rows)
        paths.append(path)
    return paths


def _table_to_examples(table: pa.Table, path: Path, first_row: int = 0) -> Examples:
    """Rows of a Parquet table (``first_row``: where it starts in ``path``, for messages)."""
    require_columns(table, path, {"id": "int64", "domain": "string"})
    ids = table.column("id").to_numpy()
    domains = np.array(table.column("domain").to_pylist(), dtype=object)
    docs = (
        np.array(table.column("doc").to_pylist(), dtype=object)
        if "doc" in table.column_names
        else domains.copy()
    )
    fields: dict[str, np.ndarray] = {}
    if "tokens" in table.column_names:
        require_columns(table, path, {"tokens": "list<"})
        lists = table.column("tokens").combine_chunks()
        lengths = np.diff(lists.offsets.to_numpy())
        if len(lengths) and (lengths != lengths[0]).any():
            bad = int(np.argmax(lengths != lengths[0]))
            raise InputError(
                f"{path}: row {first_row + bad}: tokens has {lengths[bad]} entries, "
                f"expected {lengths[0]}"
            )
        width = int(lengths[0]) if len(lengths) else 0
        fields["tokens"] = lists.flatten().to_numpy().astype(np.int32).reshape(len(ids), width)
        if "offset" in table.column_names:
            require_columns(table, path, {"offset": "int64"})
            fields["offset"] = table.column("offset").to_numpy().astype(np.int64)
    elif "image" in table.column_names:
        require_columns(table, path, {"label": "int64"})
        meta = table.schema.metadata or {}
        if IMAGE_SHAPE_KEY not in meta:
            raise InputError(f"{path}: image column without the grasp.image_shape schema metadata")
        shape = tuple(json.loads(meta[IMAGE_SHAPE_KEY]))
        raw = b"".join(table.column("image").to_pylist())
        fields["image"] = np.frombuffer(raw, dtype=np.uint8).reshape((len(ids), *shape)).copy()
        fields["label"] = table.column("label").to_numpy().astype(np.int64)
    else:
        raise InputError(f"{path}: needs a 'tokens' or an 'image' column")
    return Examples(ids.astype(np.int64), domains, docs, fields)


def shard_paths(folder: Path) -> list[Path]:
    paths = sorted(Path(folder).glob("part-*.parquet"))
    if not paths:
        raise InputError(f"{folder}: no part-*.parquet shards; run `grasp prepare` first")
    return paths


def _concat(parts: list[Examples]) -> Examples:
    return Examples(
        np.concatenate([p.ids for p in parts]),
        np.concatenate([p.domains for p in parts]),
        np.concatenate([p.docs for p in parts]),
        {name: np.concatenate([p.fields[name] for p in parts]) for name in parts[0].fields},
    )


def read_examples(folder_or_file: Path) -> Examples:
    """All rows of a corpus folder (its shards in order) or of one task file."""
    target = Path(folder_or_file)
    paths = shard_paths(target) if target.is_dir() else [target]
    parts = [_table_to_examples(read_table(path), path) for path in paths]
    examples = _concat(parts)
    unique, counts = np.unique(examples.ids, return_counts=True)
    if (counts > 1).any():
        dupes = unique[counts > 1][:5].tolist()
        raise InputError(f"{target}: duplicate ids {dupes}; ids must be unique")
    return examples


def iter_example_blocks(
    folder: Path, start: int, stop: int, block_rows: int
) -> Iterator[tuple[int, Examples]]:
    """Stream rows ``[start, stop)`` of a corpus folder in blocks, reading only the row groups needed.

    Yields ``(first_row, examples)``; memory stays bounded by a block and a row group.
    """
    offset = 0
    pending: list[Examples] = []
    pending_start = start
    for path in shard_paths(folder):
        handle = parquet_file(path)
        metadata = handle.metadata
        file_start = offset
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            group_start, group_stop = offset, offset + rows
            offset = group_stop
            if group_stop <= start or group_start >= stop:
                continue
            table = handle.read_row_group(group)
            table = table.replace_schema_metadata(handle.schema_arrow.metadata)
            examples = _table_to_examples(table, path, group_start - file_start)
            lo, hi = max(start, group_start) - group_start, min(stop, group_stop) - group_start
            pending.append(examples.take(np.arange(lo, hi)))
            while sum(len(p) for p in pending) >= block_rows:
                merged = _concat(pending)
                yield pending_start, merged.take(np.arange(block_rows))
                rest = merged.take(np.arange(block_rows, len(merged)))
                pending = [rest] if len(rest) else []
                pending_start += block_rows
        if offset >= stop:
            break
    if pending and sum(len(p) for p in pending):
        yield pending_start, _concat(pending)


def count_rows(folder: Path) -> int:
    return sum(parquet_file(path).metadata.num_rows for path in shard_paths(folder))


def read_tasks(folder: Path) -> dict[str, Examples]:
    """Every ``<task>.parquet`` in the tasks folder, by task name (sorted)."""
    paths = sorted(Path(folder).glob("*.parquet"))
    if not paths:
        raise InputError(f"{folder}: no task files; run `grasp prepare` first")
    return {path.stem: read_examples(path) for path in paths}


# ---------------------------------------------------------------- streamed writing


class PartWriter:
    """Rows -> ``folder/part-NNNNN.parquet`` as they come, without holding more than a row group.

    A part holds ``shard_rows`` rows in row groups of ``row_group_rows``. Each part is written
    under a temporary name and renamed when it is full (or at ``close``), so a reader never
    sees half a part. ``write(examples, extra)`` appends rows; ``extra`` adds columns (e.g. the
    sort keys of prepare's staging parts). ``close()`` returns the parts written, in order.
    """

    def __init__(
        self, folder: Path, shard_rows: int, row_group_rows: int, first_part: int = 0
    ) -> None:
        self.folder = Path(folder)
        self.shard_rows = max(1, int(shard_rows))
        self.row_group_rows = max(1, int(row_group_rows))
        self.next_part = first_part
        self.paths: list[Path] = []
        self.rows_written = 0
        self._pending: list[tuple[Examples, dict[str, np.ndarray]]] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._part_rows = 0

    def write(self, examples: Examples, extra: dict[str, np.ndarray] | None = None) -> None:
        if len(examples) == 0:
            return
        self._pending.append((examples, dict(extra or {})))
        self._pending_rows += len(examples)
        while self._pending_rows >= self._group_size():
            self._flush_group(self._group_size())

    def close(self) -> list[Path]:
        while self._pending_rows:
            self._flush_group(min(self._pending_rows, self._group_size()))
        self._finish_part()
        return self.paths

    def abort(self) -> None:
        """Drop the part being written (its temporary file); finished parts stay."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def _group_size(self) -> int:
        return min(self.row_group_rows, self.shard_rows - self._part_rows)

    def _flush_group(self, rows: int) -> None:
        merged = _concat([e for e, _ in self._pending])
        extra = {
            name: np.concatenate([x[name] for _, x in self._pending])
            for name in self._pending[0][1]
        }
        head = np.arange(rows)
        table = examples_to_table(merged.take(head))
        for name, values in extra.items():
            table = table.append_column(name, pa.array(values[:rows]))
        rest = np.arange(rows, len(merged))
        self._pending = [(merged.take(rest), {k: v[rows:] for k, v in extra.items()})]
        self._pending_rows = len(rest)
        if not self._pending_rows:
            self._pending = []
        if self._writer is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._tmp = _tmp_name(self._part_path())
            self._writer = pq.ParquetWriter(self._tmp, table.schema)
        self._writer.write_table(table, row_group_size=rows)
        self._part_rows += rows
        self.rows_written += rows
        if self._part_rows >= self.shard_rows:
            self._finish_part()

    def _part_path(self) -> Path:
        return self.folder / f"part-{self.next_part:05d}.parquet"

    def _finish_part(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        path = self._part_path()
        os.replace(self._tmp, path)
        self.paths.append(path)
        self._writer, self._tmp, self._part_rows = None, None, 0
        self.next_part += 1


def write_examples_stream(
    folder: Path, blocks: Iterable[Examples], shard_rows: int, row_group_rows: int
) -> list[Path]:
    """``write_examples`` for rows that arrive in blocks (never all in memory)."""
    writer = PartWriter(folder, shard_rows, row_group_rows)
    try:
        for block in blocks:
            writer.write(block)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


# ---------------------------------------------------------------- reading only what is needed


def read_columns(folder: Path, names: list[str]) -> dict[str, np.ndarray]:
    """Columns ``names`` of every shard of a corpus folder (in row order), nothing else read.

    Integer columns come back as numpy arrays; ``domain``/``doc`` as object arrays of str
    (use ``Corpus.domain_codes`` for codes without a Python string per row).
    """
    out: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for path in shard_paths(folder):
        table = read_table(path, columns=names)
        for name in names:
            column = table.column(name)
            if pa.types.is_integer(column.type):
                out[name].append(column.to_numpy())
            else:
                out[name].append(np.array(column.to_pylist(), dtype=object))
    return {name: np.concatenate(parts) if parts else np.zeros(0) for name, parts in out.items()}


class Corpus:
    """A corpus folder opened for reading without loading it.

    Opening reads the Parquet footers only (row counts, schemas: a missing or mistyped column
    is an ``InputError`` naming the shard) and checks the ids unique (streamed when they
    increase, as ``prepare`` writes them). Then:

    - ``ids`` ``[N]`` int64 (read and checked unique on first use), ``iter_ids()`` (shard by
      shard) and ``domain_codes()`` (the narrowest integer codes, sorted names): columns only;
    - ``iter_blocks(start, stop, block_rows)``: rows streamed by row group;
    - ``iter_rows(rows, block_rows)``: chosen rows (sorted), reading only their row groups;
    - ``to_torch()``: every field as a row store that reads a batch's rows by offset from one
      flat file per field (``RUN/_grasp/rows-<signature>/``, built once under a lock and shared
      by every process of a job array through the page cache), so training on any subset
      holds only the batch, never the corpus.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.paths = shard_paths(self.folder)
        self.part_rows: list[int] = []
        self.group_rows: list[list[int]] = []
        schemas = []
        for path in self.paths:
            metadata = _metadata(path)
            self.part_rows.append(metadata.num_rows)
            self.group_rows.append(
                [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
            )
            schemas.append(_checked_schema(metadata, path))
        self.kind = schemas[0][0]
        for (kind, _), path in zip(schemas, self.paths, strict=True):
            if kind != self.kind:
                raise InputError(f"{path}: a {kind} shard in a {self.kind} corpus")
        self.image_shape = schemas[0][1]
        self.part_starts = np.concatenate([[0], np.cumsum(self.part_rows)]).astype(np.int64)
        self._ids: np.ndarray | None = None
        self._order: np.ndarray | None = None  # argsort of ids, made when positions() is asked
        self._stores: dict[str, RowFile] | None = None
        self._check_unique_ids()

    def __len__(self) -> int:
        return int(self.part_starts[-1])

    @property
    def ids(self) -> np.ndarray:
        """int64 ``[N]``, every row's id (read when first asked: stages that only stream the
        corpus never hold ``N`` ids; ``iter_ids`` reads them shard by shard)."""
        if self._ids is None:
            self._ids = read_columns(self.folder, ["id"])["id"].astype(np.int64)
        return self._ids

    def _check_unique_ids(self) -> None:
        """Ids must be unique. ``prepare`` numbers rows in increasing order, which a streamed
        pass confirms holding one shard's ids; any other order is checked by sorting them all."""
        last = None
        for _, ids in self.iter_ids():
            if len(ids) == 0:
                continue
            if (ids[1:] <= ids[:-1]).any() or (last is not None and ids[0] <= last):
                break
            last = ids[-1]
        else:
            return
        sorted_ids = np.sort(self.ids)
        repeated = sorted_ids[1:] == sorted_ids[:-1]
        if repeated.any():
            dupes = np.unique(sorted_ids[1:][repeated])[:5].tolist()
            raise InputError(f"{self.folder}: duplicate ids {dupes}; ids must be unique")

    def iter_ids(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, int64 ids)`` of each shard in row order: one shard's ids held."""
        for path, start in zip(self.paths, self.part_starts, strict=False):
            ids = read_table(path, columns=["id"]).column("id").to_numpy()
            yield int(start), np.asarray(ids, dtype=np.int64)

    def domain_codes(self) -> tuple[np.ndarray, list[str]]:
        """Codes ``[N]`` into the sorted domain names, read as a dictionary column: int8 up
        to 127 domains (int16, int32 beyond), one byte a row."""
        seen: dict[str, int] = {}  # name -> code in order of first appearance
        parts: list[np.ndarray] = []  # codes in that order (int16 while they fit), per chunk
        for path in self.paths:
            try:
                column = pq.read_table(path, columns=["domain"], read_dictionary=["domain"])
            except (pa.ArrowException, OSError) as exc:
                raise InputError(f"{path}: not a readable Parquet file ({exc})") from None
            for chunk in column.column("domain").chunks:
                local = [seen.setdefault(name, len(seen)) for name in chunk.dictionary.to_pylist()]
                indices = chunk.indices.to_numpy(zero_copy_only=False)
                narrow = np.int16 if len(seen) <= 32767 else np.int32
                parts.append(np.asarray(local, dtype=narrow)[indices])
            del column
        names = sorted(seen)
        dtype = np.int8 if len(names) <= 127 else np.int16 if len(names) <= 32767 else np.int32
        remap = np.zeros(max(len(names), 1), dtype=dtype)
        remap[[seen[name] for name in names]] = np.arange(len(names))  # appearance -> sorted
        codes = np.empty(sum(len(p) for p in parts), dtype=dtype)
        at = 0
        for part in parts:
            codes[at : at + len(part)] = remap[part]
            at += len(part)
        return codes, names

    def positions(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row of each id in ``ids`` and whether it is known (``rows[~known]`` is meaningless)."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(self.ids) == 0:
            return np.zeros(len(ids), np.int64), np.zeros(len(ids), bool)
        if self._order is None:
            self._order = np.argsort(self.ids, kind="stable")
        sorted_ids = self.ids[self._order]
        at = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
        return self._order[at].astype(np.int64), sorted_ids[at] == ids

    def row_shapes(self) -> dict[str, tuple[int, ...]]:
        if self.kind == "tokens":
            return {"tokens": (self._token_width(),)}
        return {"image": self.image_shape, "label": ()}

    def manifest_extra(self) -> dict:
        """The ``extra`` of the corpus manifest (``_grasp/manifest.json``); {} when absent or
        unreadable (callers then read the data itself)."""
        try:
            text = (self.folder / MANIFEST_NAME).read_text(encoding="utf-8")
            extra = json.loads(text)["extra"]
        except (OSError, ValueError, KeyError, TypeError):
            return {}
        return extra if isinstance(extra, dict) else {}

    def num_classes(self) -> int:
        """Largest label + 1: from the corpus manifest when it says, else from the label column."""
        if "num_classes" in (extra := self.manifest_extra()):
            try:
                return int(extra["num_classes"])
            except (ValueError, TypeError):
                pass
        labels = read_columns(self.folder, ["label"])["label"]
        return int(labels.max()) + 1

    def _token_width(self) -> int:
        for path, groups in zip(self.paths, self.group_rows, strict=True):
            if any(groups):
                handle = parquet_file(path)
                table = handle.read_row_group(0, columns=["tokens"])
                offsets = table.column("tokens").combine_chunks().offsets.to_numpy()
                return int(offsets[1] - offsets[0])
        return 0

    def iter_blocks(self, start: int, stop: int, block_rows: int) -> Iterator[tuple[int, Examples]]:
        return iter_example_blocks(self.folder, start, stop, block_rows)

    def max_token_id(self, pad_id: int, block_rows: int = 65536) -> int:
        """The largest token id other than ``pad_id`` (-1 if none): the corpus manifest's
        ``max_token_id`` when prepare recorded it (over the corpus and its tasks, so at least
        the corpus's own largest id) for this ``pad_id``, else streamed block by block."""
        extra = self.manifest_extra()
        if "max_token_id" in extra and int(extra.get("pad_id", BYTE_PAD_ID)) == pad_id:
            return int(extra["max_token_id"])
        largest = -1
        for _, block in self.iter_blocks(0, len(self), block_rows):
            tokens = block.fields["tokens"]
            real = tokens[tokens != pad_id]
            if real.size:
                largest = max(largest, int(real.max()))
        return largest

    def iter_rows(self, rows: np.ndarray, block_rows: int = 8192) -> Iterator[Examples]:
        """The rows ``rows`` (sorted ascending, unique), in blocks, reading only the row
        groups that hold one of them."""
        rows = np.asarray(rows, dtype=np.int64)
        pending: list[Examples] = []
        count = 0
        group_start = 0
        for path, groups in zip(self.paths, self.group_rows, strict=True):
            handle = None
            file_start = group_start
            for group, size in enumerate(groups):
                lo, hi = np.searchsorted(rows, [group_start, group_start + size])
                if hi > lo:
                    handle = handle or parquet_file(path)
                    table = handle.read_row_group(group)
                    table = table.replace_schema_metadata(handle.schema_arrow.metadata)
                    examples = _table_to_examples(table, path, group_start - file_start)
                    pending.append(examples.take(rows[lo:hi] - group_start))
                    count += hi - lo
                    if count >= block_rows:
                        yield _concat(pending)
                        pending, count = [], 0
                group_start += size
        if pending:
            yield _concat(pending)

    def signature(self) -> str:
        """Changes whenever a shard changes: the manifest's fingerprint (if any) and every
        shard's name, size and modification time."""
        digest = hashlib.sha256()
        manifest = self.folder / MANIFEST_NAME
        if manifest.is_file():
            digest.update(manifest.read_bytes())
        for path in self.paths:
            info = path.stat()
            digest.update(f"{path.name}:{info.st_size}:{info.st_mtime_ns};".encode())
        return digest.hexdigest()[:16]

    def to_torch(self) -> dict[str, TorchRows]:
        """Every field as a ``TorchRows`` view (what ``Examples.to_torch`` gives, read lazily)."""
        if self._stores is None:
            self._stores = build_row_store(self)
        return {name: TorchRows(store, name) for name, store in self._stores.items()}


def open_corpus(folder: Path) -> Corpus:
    """The corpus at ``folder`` for reading (footers, schemas and ids checked; no rows read)."""
    return Corpus(folder)


def _metadata(path: Path) -> pq.FileMetaData:
    try:
        return pq.read_metadata(path)
    except (pa.ArrowException, OSError) as exc:
        raise unreadable_parquet(path, exc) from None


def _checked_schema(metadata: pq.FileMetaData, path: Path) -> tuple[str, tuple[int, ...]]:
    """``("tokens", ())`` or ``("image", shape)`` after checking the columns' types."""
    schema = metadata.schema.to_arrow_schema()
    empty = schema.empty_table()
    require_columns(empty, path, {"id": "int64", "domain": "string"})
    if "tokens" in schema.names:
        require_columns(empty, path, {"tokens": "list<"})
        value_type = schema.field("tokens").type.value_type
        if not pa.types.is_integer(value_type):
            raise InputError(
                f"{path}: column 'tokens' has type {schema.field('tokens').type}, expected list<int32>"
            )
        return "tokens", ()
    if "image" in schema.names:
        require_columns(empty, path, {"label": "int64"})
        meta = schema.metadata or {}
        if IMAGE_SHAPE_KEY not in meta:
            raise InputError(f"{path}: image column without the grasp.image_shape schema metadata")
        return "image", tuple(int(s) for s in json.loads(meta[IMAGE_SHAPE_KEY]))
    raise InputError(f"{path}: needs a 'tokens' or an 'image' column")


# ---------------------------------------------------------------- the row store


def read_npy_header(handle: Any) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, data offset)`` of the ``.npy`` file open at ``handle``."""
    version = np.lib.format.read_magic(handle)
    read_header = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, fortran, dtype = read_header(handle)
    return tuple(shape), bool(fortran), np.dtype(dtype), handle.tell()


class RowFile:
    """One field of every corpus row in a flat ``.npy`` file, read by offset.

    ``take(rows)`` reads just those rows with positioned reads (runs of consecutive rows in
    one read): a process holds the batch it asked for, and the file's pages live in the
    shared page cache, not in any process's memory.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            shape, fortran, dtype, self.offset = read_npy_header(handle)
        if fortran:
            raise InputError(f"{self.path}: not a C-ordered array")
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_shape = self.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self._fd: int | None = None
        self._pid = -1

    def _handle(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked child opens its own
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (any shape of int indices) -> ``[*rows.shape, *row_shape]``."""
        rows = np.asarray(rows, dtype=np.int64)
        flat = rows.reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= self.shape[0]):
            raise IndexError(f"{self.path}: row index out of range [0, {self.shape[0]})")
        unique, inverse = np.unique(flat, return_inverse=True)
        out = np.empty((len(unique), *self.row_shape), dtype=self.dtype)
        buffer = out.reshape(len(unique), -1).view(np.uint8).reshape(len(unique), -1)
        breaks = np.flatnonzero(np.diff(unique) != 1) + 1
        fd = self._handle()
        for run_start, run_stop in zip(
            np.concatenate([[0], breaks]), np.concatenate([breaks, [len(unique)]]), strict=True
        ):
            size = int(run_stop - run_start) * self.row_bytes
            data = os.pread(fd, size, self.offset + int(unique[run_start]) * self.row_bytes)
            if len(data) != size:
                raise InputError(f"{self.path}: truncated (rebuilt on the next run)")
            buffer[run_start:run_stop] = np.frombuffer(data, np.uint8).reshape(
                run_stop - run_start, -1
            )
        return out[inverse].reshape(*rows.shape, *self.row_shape)


class TorchRows:
    """A ``RowFile`` indexed like the tensor ``Examples.to_torch`` would give: ``view[index]``
    with a torch index of any shape returns those rows as a tensor (int64 for tokens and
    labels, uint8 images); ``shape[0]`` is N. What ``train``/``train_many`` need, nothing more."""

    def __init__(self, store: RowFile, name: str) -> None:
        self.store, self.name = store, name
        self.shape = store.shape

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        import torch

        rows = self.store.take(np.asarray(index.cpu().numpy() if torch.is_tensor(index) else index))
        tensor = torch.from_numpy(np.ascontiguousarray(rows))
        return tensor if self.name == "image" else tensor.long()

    def __len__(self) -> int:
        return self.shape[0]


ROW_STORE_INFO = "rows.json"


def build_row_store(corpus: Corpus) -> dict[str, RowFile]:
    """The flat row files of ``corpus`` in ``<run>/_grasp/rows-<signature>/``: built once
    (streamed, one row group at a time) under a lock, reused while the corpus is unchanged;
    row stores of earlier corpora are removed when a new one is built."""
    cache = corpus.folder.parent / SCRATCH
    folder = cache / f"rows-{corpus.signature()}"
    with creation_lock(cache / "rows"):
        if not (folder / ROW_STORE_INFO).is_file():
            for old in cache.glob("rows-*"):
                shutil.rmtree(old, ignore_errors=True)
            sweep_debris(cache, None)
            with atomic_dir(folder) as tmp:
                _write_row_files(corpus, tmp)
    info = json.loads((folder / ROW_STORE_INFO).read_text(encoding="utf-8"))
    return {name: RowFile(folder / f"{name}.npy") for name in info["fields"]}


def _token_dtype(corpus: Corpus) -> np.dtype:
    """uint16 when every shard's statistics say the tokens fit, else int32."""
    low, high = 0, 0
    for path in corpus.paths:
        metadata = _metadata(path)
        leaf = [
            i
            for i in range(metadata.num_columns)
            if metadata.schema.column(i).path.startswith("tokens.")
        ]
        for group in range(metadata.num_row_groups):
            stats = metadata.row_group(group).column(leaf[0]).statistics if leaf else None
            if stats is None or not stats.has_min_max:
                return np.dtype(np.int32)
            low, high = min(low, stats.min), max(high, stats.max)
    return np.dtype(np.uint16 if low >= 0 and high < 2**16 else np.int32)


def _write_row_files(corpus: Corpus, folder: Path) -> None:
    n = len(corpus)
    if corpus.kind == "tokens":
        specs = {"tokens": ((n, *corpus.row_shapes()["tokens"]), _token_dtype(corpus))}
    else:
        specs = {
            "image": ((n, *corpus.image_shape), np.dtype(np.uint8)),
            "label": ((n,), np.dtype(np.int64)),
        }
    handles = {name: open(folder / f"{name}.npy", "wb") for name in specs}  # noqa: SIM115
    try:
        for name, (shape, dtype) in specs.items():
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False}
            np.lib.format.write_array_header_1_0(handles[name], {**header, "shape": shape})
        for _, block in corpus.iter_blocks(0, n, 8192):
            for name, (shape, dtype) in specs.items():
                values = block.fields[name]
                if values.shape[1:] != shape[1:]:
                    raise InputError(
                        f"{corpus.folder}: {name} rows of shape {list(values.shape[1:])} "
                        f"in a corpus of {list(shape[1:])}"
                    )
                if (
                    dtype == np.uint16
                    and values.size
                    and (values.min() < 0 or values.max() >= 2**16)
                ):
                    raise InputError(f"{corpus.folder}: token statistics disagree with the tokens")
                handles[name].write(np.ascontiguousarray(values, dtype=dtype).tobytes())
    finally:
        for handle in handles.values():
            handle.close()
    info = {"rows": n, "fields": list(specs), "signature": corpus.signature()}
    (folder / ROW_STORE_INFO).write_text(json.dumps(info))
