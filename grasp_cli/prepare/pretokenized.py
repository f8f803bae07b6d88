"""Reading corpora that are already tokenized: Parquet ``input_ids`` and flat .bin/.npy arrays.

- **Parquet** with a list-of-integers column ``input_ids`` (or ``tokens``), as ``datasets``
  exports a tokenized dataset; optional ``domain`` and ``id`` columns as for text Parquet.
  One row is one document (EOS is appended unless its ids already end with it).
- **Flat token arrays**, as nanoGPT (``train.bin``, uint16) and OLMo/Dolma-style pipelines
  write them: the documents' ids back to back, each followed by EOS. ``.npy`` carries its
  dtype; ``.bin`` is raw little-endian ``prepare.token_dtype`` (uint16 or uint32). It is read
  through ``np.memmap`` in pieces of ``SCAN_TOKENS``, never loaded whole. Domains and ids
  come from an optional sidecar ``FILE.domains.jsonl`` (e.g. ``train.bin.domains.jsonl``): one
  JSON object per document, in order, with ``domain`` and optionally ``id``; without it every
  document is in the domain ``FILE``'s stem and its id is ``<stem>-<document number>``.

Every id is checked against the token space's vocabulary; bad input raises ``InputError``
naming the file (and row or token position).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from grasp_cli.artifacts.tables import parquet_file, unreadable_parquet
from grasp_cli.errors import InputError
from grasp_cli.prepare.documents import (
    DOMAINS_SIDECAR,
    PARQUET_BATCH_ROWS,
    TOKEN_SUFFIXES,
    document_id,
)
from grasp_cli.prepare.tokens import TokenSpace, streamed_unit
from grasp_cli.prepare.units import Unit

TOKEN_COLUMNS = ("input_ids", "tokens")
SCAN_TOKENS = 1 << 22  # tokens read from a flat file at once (16 MiB of uint32)


def is_pretokenized(path: Path) -> bool:
    """A flat token file, or a Parquet file with a token column and no ``text`` column."""
    if path.suffix in TOKEN_SUFFIXES:
        return True
    if path.suffix != ".parquet":
        return False
    names = parquet_file(path).schema_arrow.names
    return "text" not in names and any(name in names for name in TOKEN_COLUMNS)


def pretokenized_units(
    path: Path, seq_len: int, space: TokenSpace | None, token_dtype: str
) -> Iterator[Unit]:
    """The units (documents) of one pre-tokenized file, with their rows in ``space``."""
    if space is None:
        raise InputError(
            f"{path}: a pre-tokenized input needs its token space: set prepare.tokenizer (the "
            "tokenizer that made it) or prepare.eos_id and prepare.vocab_size"
        )
    if path.suffix == ".parquet":
        yield from _parquet_units(path, seq_len, space)
    else:
        yield from _flat_units(path, seq_len, space, token_dtype)


# ---------------------------------------------------------------- Parquet input_ids


def _parquet_units(path: Path, seq_len: int, space: TokenSpace) -> Iterator[Unit]:
    handle = parquet_file(path)
    schema = handle.schema_arrow
    column = next(name for name in TOKEN_COLUMNS if name in schema.names)
    kind = schema.field(column).type
    list_like = pa.types.is_list(kind) or pa.types.is_large_list(kind)
    if not list_like or not pa.types.is_integer(kind.value_type):
        raise InputError(
            f"{path}: column {column!r} has type {kind}, expected a list of integer token ids"
        )
    columns = [column] + [name for name in ("domain", "id") if name in schema.names]
    row = 0
    try:
        for batch in handle.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            lists = batch.column(column)
            offsets = lists.offsets.to_numpy()
            values = lists.values.to_numpy(zero_copy_only=False)
            valid = lists.is_valid().to_numpy(zero_copy_only=False)
            domains = batch.column("domain").to_pylist() if "domain" in batch.schema.names else None
            ids = batch.column("id").to_pylist() if "id" in batch.schema.names else None
            for index in range(batch.num_rows):
                where = f"{path}:row {row}"
                if not valid[index]:
                    raise InputError(f"{where}: {column} is null")
                tokens = values[offsets[index] - offsets[0] : offsets[index + 1] - offsets[0]]
                space.check(tokens, where)
                doc = document_id(ids[index] if ids else None, where, f"{path.stem}-{row}")
                domain = str((domains[index] if domains else None) or path.stem)
                if not len(tokens):  # an empty document: read, holds nothing
                    yield Unit(doc, domain, where, (), skip=True)
                else:
                    pieces = [tokens]
                    if int(tokens[-1]) != space.eos_id:
                        pieces.append(np.array([space.eos_id], dtype=np.int32))
                    yield streamed_unit(doc, domain, where, iter(pieces), seq_len, space.pad_id)
                row += 1
    except (pa.ArrowException, OSError) as exc:
        raise unreadable_parquet(path, exc) from None


# ---------------------------------------------------------------- flat .bin / .npy


def flat_tokens(path: Path, token_dtype: str) -> np.ndarray:
    """The ids of a flat token file as a read-only memory map (1-D, unsigned integers)."""
    if path.suffix == ".npy":
        try:
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise InputError(f"{path}: not a readable .npy array ({exc})") from None
        if tokens.ndim != 1 or tokens.dtype.kind not in "ui":
            raise InputError(
                f"{path}: expected a 1-D array of integer token ids, got {tokens.dtype} "
                f"of shape {list(tokens.shape)}"
            )
        return tokens
    if not token_dtype:
        raise InputError(
            f"{path}: a .bin token file has no dtype; set prepare.token_dtype = 'uint16' or 'uint32'"
        )
    dtype = np.dtype(token_dtype).newbyteorder("<")
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise InputError(
            f"{path}: {size} bytes is not a whole number of {token_dtype} tokens "
            f"({dtype.itemsize} bytes each); check prepare.token_dtype"
        )
    if size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _document_bounds(tokens: np.ndarray, eos: int, path: Path) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of each document of a flat array (its EOS included; a last document
    without EOS ends at the end of the file), found ``SCAN_TOKENS`` at a time."""
    start = 0
    for low in range(0, len(tokens), SCAN_TOKENS):
        chunk = np.asarray(tokens[low : low + SCAN_TOKENS])
        for at in np.flatnonzero(chunk == eos).tolist():
            yield start, low + at + 1
            start = low + at + 1
    if start < len(tokens):
        yield start, len(tokens)


def _sidecar(path: Path) -> Iterator[tuple[dict, str]] | None:
    """``(record, where)`` per line of ``FILE.domains.jsonl``, or None without one."""
    side = path.with_name(path.name + DOMAINS_SIDECAR)
    if not side.is_file():
        return None

    def records() -> Iterator[tuple[dict, str]]:
        with open(side, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{side}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{where}: invalid JSON ({exc.msg})") from None
                if not isinstance(record, dict):
                    raise InputError(f"{where}: expected an object with 'domain' (and 'id')")
                yield record, where

    return records()


def _flat_units(path: Path, seq_len: int, space: TokenSpace, token_dtype: str) -> Iterator[Unit]:
    tokens = flat_tokens(path, token_dtype)
    described = _sidecar(path)
    count = 0
    for number, (start, stop) in enumerate(_document_bounds(tokens, space.eos_id, path)):
        where = f"{path}:token {start}"
        doc, domain = f"{path.stem}-{number}", path.stem
        if described is not None:
            record, side_where = next(described, (None, ""))
            if record is None:
                raise InputError(
                    f"{path.name}{DOMAINS_SIDECAR}: fewer lines than {path}'s documents "
                    f"(document {number} at token {start} has none)"
                )
            domain = str(record.get("domain") or domain)
            doc = document_id(record.get("id"), side_where, doc)
        count = number + 1
        ends = int(tokens[stop - 1]) == space.eos_id
        if stop - start - ends == 0:  # EOS right after EOS: an empty document
            yield Unit(doc, domain, where, (), skip=True)
            continue

        def pieces(start: int = start, stop: int = stop, ends: bool = ends) -> Iterator[np.ndarray]:
            for low in range(start, stop, SCAN_TOKENS):
                piece = np.asarray(tokens[low : min(stop, low + SCAN_TOKENS)])
                space.check(piece, str(path), first=low)
                yield piece
            if not ends:
                yield np.array([space.eos_id], dtype=np.int32)

        yield streamed_unit(doc, domain, where, pieces(), seq_len, space.pad_id)
    if described is not None and next(described, None) is not None:
        raise InputError(
            f"{path.name}{DOMAINS_SIDECAR}: more lines than {path}'s {count} documents"
        )
