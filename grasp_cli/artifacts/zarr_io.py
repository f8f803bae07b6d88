"""Reading Zarr artifacts so that a corrupt chunk or metadata file is an ``InputError`` naming it.

Zarr and numcodecs report damage as whatever the codec raises (``RuntimeError: Zstd
decompression error``, ``ValueError: cannot reshape ...``, a JSON error for a broken
``zarr.json``). The readers here turn those into one line that names the damaged file
and the stage that rebuilds it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from grasp_cli.errors import GraspError, InputError

# What zarr/numcodecs raise for damaged bytes (decompression, reshape, metadata JSON, missing keys).
_READ_ERRORS = (RuntimeError, ValueError, OSError, KeyError, TypeError)
_MAX_CHUNKS_SEARCHED = 100_000


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


class CheckedArray:
    """A read-only view of a Zarr array whose reads raise ``InputError`` naming the damaged chunk.

    Supports what the stages use: ``shape``, ``dtype``, ``ndim``, ``len()``, basic
    slicing and ``get_orthogonal_selection``.
    """

    def __init__(self, array: zarr.Array, path: Path, rebuild: str) -> None:
        self._array = array
        self.path = Path(path)
        self._rebuild = rebuild

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
        return self._read(lambda: self._array[selection])

    def get_orthogonal_selection(self, selection: Any) -> np.ndarray:
        return self._read(lambda: self._array.get_orthogonal_selection(selection))

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
                f"{where}: corrupt or unreadable Zarr data ({_first_line(exc)}); {self._rebuild}"
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


class CheckedGroup:
    """A read-only Zarr group whose arrays are ``CheckedArray``s."""

    def __init__(self, group: zarr.Group, path: Path, rebuild: str) -> None:
        self._group = group
        self.path = Path(path)
        self._rebuild = rebuild

    @property
    def attrs(self) -> Any:
        return self._group.attrs

    def __contains__(self, name: str) -> bool:
        return name in self._group

    def __getitem__(self, name: str) -> CheckedArray:
        try:
            array = self._group[name]
        except GraspError:
            raise
        except KeyError:
            raise InputError(f"{self.path}: has no array {name!r}; {self._rebuild}") from None
        except _READ_ERRORS as exc:
            raise InputError(
                f"{self.path / name}: corrupt Zarr metadata ({_first_line(exc)}); {self._rebuild}"
            ) from None
        if not isinstance(array, zarr.Array):
            raise InputError(f"{self.path / name}: expected a Zarr array; {self._rebuild}")
        return CheckedArray(array, self.path / name, self._rebuild)


def open_group_read(path: Path, stage: str) -> CheckedGroup:
    """Open the Zarr group at ``path`` for reading; ``stage`` is the command that rebuilds it."""
    path = Path(path)
    rebuild = f"rerun `grasp {stage} --force` to rebuild it"
    if not path.is_dir():
        raise InputError(f"{path}: not found; run `grasp {stage}` first")
    try:
        group = zarr.open_group(str(path), mode="r")
    except GraspError:
        raise
    except _READ_ERRORS as exc:  # GroupNotFoundError is a ValueError
        raise InputError(
            f"{path}: not a readable Zarr group ({_first_line(exc)}); {rebuild}"
        ) from None
    return CheckedGroup(group, path, rebuild)
