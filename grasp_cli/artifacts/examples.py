"""Corpus and task shards: the ``examples`` schema every stage reads.

Text:   id int64, domain string, doc string, tokens list<int32>   (seq_len + 1 tokens per row)
Images: id int64, domain string, doc string, image binary (uint8, C-order), label int64;
        the image shape is stored in the schema metadata key ``grasp.image_shape``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from grasp_cli.artifacts.tables import parquet_file, read_table, require_columns, write_table
from grasp_cli.errors import InputError

IMAGE_SHAPE_KEY = b"grasp.image_shape"


@dataclass
class Examples:
    """Rows of a corpus or task, in memory. ``fields`` holds 'tokens' or 'image' + 'label'."""

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
        out = {}
        for name, values in self.fields.items():
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


def _table_to_examples(table: pa.Table, path: Path) -> Examples:
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
                f"{path}: row {bad}: tokens has {lengths[bad]} entries, expected {lengths[0]}"
            )
        width = int(lengths[0]) if len(lengths) else 0
        fields["tokens"] = lists.flatten().to_numpy().astype(np.int32).reshape(len(ids), width)
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
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            group_start, group_stop = offset, offset + rows
            offset = group_stop
            if group_stop <= start or group_start >= stop:
                continue
            table = handle.read_row_group(group)
            table = table.replace_schema_metadata(handle.schema_arrow.metadata)
            examples = _table_to_examples(table, path)
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
