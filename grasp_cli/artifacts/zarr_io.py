"""Reading Zarr artifacts so that a damaged, missing or swapped chunk is an ``InputError`` naming it.

Two kinds of damage, two defences:

- *Undecodable bytes.* Zarr and numcodecs report them as whatever the codec raises
  (``RuntimeError: Zstd decompression error``, ``ValueError: cannot reshape ...``, a JSON
  error for a broken ``zarr.json``). The readers turn those into one line that names the
  damaged file and the stage that rebuilds it.
- *Decodable but wrong bytes.* A deleted chunk reads as the fill value and a chunk copied
  over another decodes fine. So every chunk's decoded values get a digest when they are
  written (``chunk_digests``, recorded in the artifact's manifest under ``extra.digests``),
  and ``CheckedArray`` compares the digest of every chunk a read touches (once per chunk
  and process) before returning anything. Reads stay streaming: a row range is read in one
  call, cut into its chunks, and each is hashed (sha256, ~1 GB/s).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from grasp_cli.errors import GraspError, InputError, first_line

Digests = dict[str, dict[str, str]]  # array name -> chunk key ("2.0") -> digest

# What zarr/numcodecs raise for damaged bytes (decompression, reshape, metadata JSON, missing keys).
_READ_ERRORS = (RuntimeError, ValueError, OSError, KeyError, TypeError)
_MAX_CHUNKS_SEARCHED = 100_000


def values_digest(values: np.ndarray) -> str:
    """sha256 (24 hex digits) of decoded chunk values: dtype, shape and C-order contents.

    Strings are hashed as their UTF-8 text joined by a unit separator, whatever numpy string
    dtype zarr hands back, so writer and reader agree.
    """
    values = np.asarray(values)
    digest = hashlib.sha256(json.dumps([list(values.shape)]).encode())
    if values.dtype.kind in "OUT":
        digest.update(b"str")
        digest.update("\x1f".join(str(v) for v in values.ravel().tolist()).encode("utf-8"))
    else:
        digest.update(values.dtype.str.encode())
        digest.update(np.ascontiguousarray(values).tobytes())
    return digest.hexdigest()[:24]


def chunk_key(coords: Iterable[int]) -> str:
    return ".".join(str(int(c)) for c in coords)


def _grid(array: Any) -> tuple[int, ...]:
    return tuple(-(-int(s) // int(c)) for s, c in zip(array.shape, array.chunks, strict=True))


def _rows_only(array: Any) -> bool:
    """Chunked along the first axis only (every grasp array is): a row range is whole chunks."""
    return len(array.shape) >= 1 and tuple(array.chunks[1:]) == tuple(array.shape[1:])


def chunk_digests(
    array: zarr.Array, coords: Iterable[tuple[int, ...]] | None = None
) -> dict[str, str]:
    """Digests of the decoded values of the chunks at ``coords`` (default: every chunk).

    Read back from the store, so they describe what a reader will decode.
    """
    chosen = list(np.ndindex(*_grid(array)) if coords is None else coords)
    return {chunk_key(c): values_digest(array.get_block_selection(tuple(c))) for c in chosen}


def row_chunk_digests(array: zarr.Array, start: int, stop: int) -> dict[str, str]:
    """Digests of the chunks holding rows ``[start, stop)`` of an array chunked along rows."""
    size = int(array.chunks[0])
    tail = (0,) * (len(array.shape) - 1)
    return chunk_digests(array, [(c, *tail) for c in range(start // size, -(-stop // size))])


class CheckedArray:
    """A read-only view of a Zarr array whose reads raise ``InputError`` naming the damaged chunk.

    Supports what the stages use: ``shape``, ``dtype``, ``ndim``, ``len()``, basic
    slicing and ``get_orthogonal_selection``.
    """

    def __init__(
        self, array: zarr.Array, path: Path, rebuild: str, digests: dict[str, str] | None = None
    ) -> None:
        self._array = array
        self.path = Path(path)
        self._rebuild = rebuild
        self._digests = digests
        self._verified: set[str] = set()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._array.shape)

    @property
    def dtype(self) -> np.dtype:
        return self._array.dtype

    @property
    def ndim(self) -> int:
        return len(self._array.shape)

    def __len__(self) -> int:
        return int(self._array.shape[0])

    def __getitem__(self, selection: Any) -> np.ndarray:
        if self._digests is None:
            return self._read(lambda: self._array[selection])
        rows = _leading_rows(selection, self.shape)
        if rows is not None and _rows_only(self._array):
            return self._read_rows_checked(rows, selection)
        self._verify(list(np.ndindex(*_grid(self._array))))
        return self._read(lambda: self._array[selection])

    def get_orthogonal_selection(self, selection: Any) -> np.ndarray:
        if self._digests is not None:
            self._verify(list(np.ndindex(*_grid(self._array))))
        return self._read(lambda: self._array.get_orthogonal_selection(selection))

    def _read_rows_checked(self, rows: tuple[int, int, Any], selection: Any) -> np.ndarray:
        """Rows ``[start, stop)`` read in one call over whole chunks, each chunk verified."""
        start, stop, rest = rows
        size = int(self._array.chunks[0])
        lo, hi = (start // size) * size, min(-(-stop // size) * size, self.shape[0])
        if stop <= start:
            return self._read(lambda: self._array[selection])
        data = self._read(lambda: self._array[lo:hi])
        tail = (0,) * (self.ndim - 1)
        for first in range(lo, hi, size):
            key = chunk_key((first // size, *tail))
            if key not in self._verified:
                self._check_chunk(key, data[first - lo : min(first + size, hi) - lo])
        picked = data[start - lo : stop - lo]
        return picked[(slice(None), *rest)] if rest else picked

    def _verify(self, coords: list[tuple[int, ...]]) -> None:
        for c in coords:
            key = chunk_key(c)
            if key not in self._verified:
                values = self._read(lambda c=c: self._array.get_block_selection(tuple(c)))
                self._check_chunk(key, values)

    def _check_chunk(self, key: str, values: np.ndarray) -> None:
        expected = (self._digests or {}).get(key)
        coords = tuple(int(c) for c in key.split("."))
        where = self.path / self._array.metadata.encode_chunk_key(coords)
        if expected is None:
            raise InputError(f"{where}: no digest recorded for this chunk; {self._rebuild}")
        if values_digest(values) != expected:
            state = "file missing" if not where.exists() else "not the data written there"
            raise InputError(f"{where}: corrupt chunk ({state}: digest mismatch); {self._rebuild}")
        self._verified.add(key)

    def verify_all(self) -> None:
        """Check every chunk against its digest (``grasp status``); no-op without digests."""
        if self._digests is None:
            return
        if _rows_only(self._array):
            size = int(self._array.chunks[0]) * max(1, (1 << 26) // max(1, self.row_bytes))
            for start in range(0, self.shape[0], size):
                self[start : min(start + size, self.shape[0])]
        else:
            self._verify(list(np.ndindex(*_grid(self._array))))

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * max(1, self.dtype.itemsize)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        values = self[...]
        return np.asarray(values, dtype=dtype) if dtype is not None else np.asarray(values)

    def _read(self, read: Callable[[], Any]) -> Any:
        try:
            return read()
        except GraspError:
            raise
        except _READ_ERRORS as exc:
            where = self._find_bad_chunk() or self.path
            raise InputError(
                f"{where}: corrupt or unreadable Zarr data ({first_line(exc)}); {self._rebuild}"
            ) from None

    def _find_bad_chunk(self) -> Path | None:
        """The first chunk file that fails to decode (only searched after a read failed)."""
        array = self._array
        try:
            grid = tuple(-(-s // c) for s, c in zip(array.shape, array.chunks, strict=True))
            if int(np.prod(grid, dtype=np.int64)) > _MAX_CHUNKS_SEARCHED:
                return None
            for coords in np.ndindex(*grid):
                try:
                    array.get_block_selection(coords)
                except _READ_ERRORS:
                    key = array.metadata.encode_chunk_key(coords)
                    return self.path / key
        except Exception:  # noqa: BLE001 - the search is best effort; the array path is named anyway
            return None
        return None


def _leading_rows(selection: Any, shape: tuple[int, ...]) -> tuple[int, int, tuple] | None:
    """``(start, stop, rest)`` when ``selection`` is a step-1 row slice (or ``...``/``[:]``) followed
    by anything for the other axes; None for other selections."""
    if selection is Ellipsis:
        return 0, shape[0], ()
    parts = selection if isinstance(selection, tuple) else (selection,)
    if not parts:
        return 0, shape[0], ()
    first, rest = parts[0], tuple(parts[1:])
    if first is Ellipsis and not rest:
        return 0, shape[0], ()
    if not isinstance(first, slice) or first.step not in (None, 1):
        return None
    start, stop, _ = first.indices(shape[0])
    if any(p is Ellipsis for p in rest):
        rest = ()  # `a[s, ...]`: the other axes whole
    return start, max(start, stop), rest


class CheckedGroup:
    """A read-only Zarr group whose arrays are ``CheckedArray``s."""

    def __init__(
        self, group: zarr.Group, path: Path, rebuild: str, digests: Digests | None = None
    ) -> None:
        self._group = group
        self.path = Path(path)
        self._rebuild = rebuild
        self._digests = digests
        self._arrays: dict[str, CheckedArray] = {}  # one per name, so verified chunks stay verified

    @property
    def attrs(self) -> Any:
        return self._group.attrs

    def __contains__(self, name: str) -> bool:
        return name in self._group

    def __getitem__(self, name: str) -> CheckedArray:
        if name in self._arrays:
            return self._arrays[name]
        try:
            array = self._group[name]
        except GraspError:
            raise
        except KeyError:
            raise InputError(f"{self.path}: has no array {name!r}; {self._rebuild}") from None
        except _READ_ERRORS as exc:
            raise InputError(
                f"{self.path / name}: corrupt Zarr metadata ({first_line(exc)}); {self._rebuild}"
            ) from None
        if not isinstance(array, zarr.Array):
            raise InputError(f"{self.path / name}: expected a Zarr array; {self._rebuild}")
        digests = None if self._digests is None else self._digests.get(name, {})
        self._arrays[name] = CheckedArray(array, self.path / name, self._rebuild, digests)
        return self._arrays[name]

    def array_names(self) -> list[str]:
        return sorted(name for name, _ in self._group.arrays())

    def verify_all(self) -> None:
        """Every chunk of every array against its recorded digest (``grasp status``)."""
        for name in self.array_names():
            self[name].verify_all()


def open_group_read(path: Path, stage: str, digests: Digests | None = None) -> CheckedGroup:
    """Open the Zarr group at ``path`` for reading; ``stage`` is the command that rebuilds it.

    ``digests`` default: those recorded in the artifact's complete manifest, if any; every read
    is then checked chunk by chunk against them.
    """
    path = Path(path)
    if digests is None:
        from grasp_cli.artifacts.manifest import read_manifest

        manifest = read_manifest(path)
        if manifest is not None and manifest.complete and "digests" in manifest.extra:
            digests = manifest.extra["digests"]
    rebuild = f"rerun `grasp {stage} --force` to rebuild it"
    if not path.is_dir():
        raise InputError(f"{path}: not found; run `grasp {stage}` first")
    try:
        group = zarr.open_group(str(path), mode="r")
    except GraspError:
        raise
    except _READ_ERRORS as exc:  # GroupNotFoundError is a ValueError
        raise InputError(
            f"{path}: not a readable Zarr group ({first_line(exc)}); {rebuild}"
        ) from None
    return CheckedGroup(group, path, rebuild, digests)
