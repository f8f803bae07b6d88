"""``RUN/sketches.zarr`` on disk: its arrays, and streamed reads of the sketch matrix.

Layout of the Zarr group (written by ``grasp sketch``): ``train`` [N, k] (chunks of
``sketch.chunk_rows`` rows), ``train_ids`` [N] int64 (corpus order), ``tasks`` [T, k]
float32 (the task residuals ``r_t = −P∇L_t``), ``task_names`` [T] str; with
``sketch.trak_k > 0`` also TRAK's ``trak_train`` [N, k_t] (ψ_i), ``trak_q`` [N] (Q_i) and
``trak_tasks`` [T, k_t] (ψ_t), and with traker beside, ``trak_ref_scores`` [N, L·T] float64. Every read goes
through ``zarr_io.CheckedArray``, so a damaged, missing or swapped chunk is an error naming
it. The sketch matrix is only ever streamed in row blocks (``iter_blocks``), so no stage
holds ``N × k`` in memory unless it chose to (exact greedy on a small corpus).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from grasp_cli.artifacts.zarr_io import CheckedArray, CheckedGroup, open_group_read
from grasp_cli.errors import InputError

BLOCK_ROWS = 65536  # rows per streamed block of the sketch matrix (fit-surrogate, score)


class LazyColumn:
    """A 1-D on-disk array ``[N]`` read a block of ``block_rows`` at a time, so that a stage
    can index per-row values (ids, TRAK's ``Q_i``) as it streams without holding ``N`` of
    them: slices read (and keep) only the blocks they touch; ``take`` reads sorted rows
    block by block. Memory: one block, whatever ``N``."""

    def __init__(self, array: Any, dtype: Any, block_rows: int = BLOCK_ROWS) -> None:
        self.array, self.dtype, self.block_rows = array, np.dtype(dtype), block_rows
        self.shape = (int(array.shape[0]),)
        self._block: tuple[int, np.ndarray] | None = None  # (first row, values)

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, lo: int, hi: int) -> np.ndarray:
        start = self._block[0] if self._block is not None else -1
        if self._block is None or lo < start or hi > start + len(self._block[1]):
            first = (lo // self.block_rows) * self.block_rows
            last = min(max(hi, first + self.block_rows), len(self))
            if hi > first + self.block_rows:  # a slice wider than one block: read it whole
                return np.asarray(self.array[lo:hi], dtype=self.dtype)
            self._block = (first, np.asarray(self.array[first:last], dtype=self.dtype))
            start = first
        return self._block[1][lo - start : hi - start]

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            lo, hi, step = index.indices(len(self))
            if step != 1:
                raise IndexError("LazyColumn: slices must have step 1")
            return self._read(lo, max(lo, hi)).copy()
        if isinstance(index, (int, np.integer)):
            row = int(index) + (len(self) if index < 0 else 0)
            return self._read(row, row + 1)[0]
        return self.take(np.asarray(index))

    def take(self, rows: np.ndarray) -> np.ndarray:
        """``values[rows]`` for any integer rows, reading only the blocks that hold them."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty(len(rows), dtype=self.dtype)
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        if len(rows) and (ordered[0] < 0 or ordered[-1] >= len(self)):
            raise IndexError(f"rows outside 0..{len(self) - 1}")
        bounds = np.searchsorted(
            ordered, np.arange(0, len(self) + self.block_rows, self.block_rows)
        )
        for b in np.flatnonzero(np.diff(bounds)):
            lo = b * self.block_rows
            block = self._read(lo, min(lo + self.block_rows, len(self)))
            out[order[bounds[b] : bounds[b + 1]]] = block[ordered[bounds[b] : bounds[b + 1]] - lo]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        values = np.asarray(self.array[:], dtype=self.dtype)  # every row: small arrays only
        return values if dtype is None else values.astype(dtype)


@dataclass
class Sketches:
    """An opened ``sketches.zarr``: the streamed matrix, the small arrays read, and the
    per-row columns (ids, ``Q_i``) as ``LazyColumn``: read block by block, never whole."""

    path: Path
    group: CheckedGroup
    train: CheckedArray  # [N, k] φ_i, streamed
    ids: LazyColumn  # [N] int64 corpus ids, row order
    residuals: np.ndarray  # [T, k] float64 r_t
    task_names: list[str]
    trak_train: CheckedArray | None = None  # [N, k_t] ψ_i, TRAK's output-gradient features
    trak_q: LazyColumn | None = None  # [N] Q_i, TRAK's out-to-loss weights
    trak_tasks: np.ndarray | None = None  # [T, k_t] ψ_t
    trak_ref: CheckedArray | None = None  # [N, L·T] traker's scores, column l·T + t

    @property
    def n(self) -> int:
        return int(self.train.shape[0])

    @property
    def k(self) -> int:
        return int(self.train.shape[1])

    def matrix(self, feature_set: str) -> Any:
        """The per-example feature rows a model of ``feature_set`` aggregates, streamable by
        rows: ``train`` (φ_i) for "sketch", ``Q_i ψ_i`` for "trak"."""
        if feature_set == "sketch":
            return self.train
        if feature_set == "trak" and self.trak_train is not None:
            return WeightedRows(self.trak_train, self.trak_q)
        raise InputError(
            f"{self.path}: has no {feature_set!r} features; rerun `grasp sketch` with sketch.trak_k > 0"
        )

    def check_ids(self, corpus: Any) -> None:
        """The sketch rows must be the corpus rows, in order (else: made from another corpus).

        ``corpus``: an opened ``Corpus``; compared shard by shard (one shard's ids held)."""
        matches = len(corpus) == self.n and all(
            np.array_equal(self.ids[start : start + len(ids)], ids)
            for start, ids in corpus.iter_ids()
        )
        if not matches:
            raise InputError(
                f"{self.path}: sketch ids do not match the corpus (train_ids do not match "
                f"{corpus.folder}); rerun `grasp sketch`"
            )

    def check_k(self, dims: list[int], what: str) -> None:
        if max(dims, default=0) > self.k:
            raise InputError(
                f"{what} {dims} exceeds the sketch dimension k = {self.k} of {self.path}"
            )


class WeightedRows:
    """Rows ``w_i · a_i`` of an array read lazily by row slices (``shape``, ``a[i:j, :k]``)."""

    def __init__(self, array: Any, weights: Any) -> None:
        self.array, self.weights = array, weights  # weights: [N], sliceable by rows
        self.shape = tuple(array.shape)
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, selection: Any) -> np.ndarray:
        rows = selection[0] if isinstance(selection, tuple) else selection
        values = np.asarray(self.array[selection], dtype=np.float64)
        weights = self.weights[rows]
        return (values * (weights[:, None] if values.ndim == 2 else weights)).astype(np.float32)


def open_sketches(path: Path) -> Sketches:
    """Open ``sketches.zarr`` for reading (digests verified chunk by chunk on every read)."""
    group = open_group_read(path, "sketch")
    has_trak = "trak_train" in group
    return Sketches(
        path=Path(path),
        group=group,
        train=group["train"],
        ids=LazyColumn(group["train_ids"], np.int64),
        residuals=np.asarray(group["tasks"][:], dtype=np.float64),
        task_names=[str(t) for t in group["task_names"][:]],
        trak_train=group["trak_train"] if has_trak else None,
        trak_q=LazyColumn(group["trak_q"], np.float64) if has_trak else None,
        trak_tasks=np.asarray(group["trak_tasks"][:], dtype=np.float64) if has_trak else None,
        trak_ref=group["trak_ref_scores"] if "trak_ref_scores" in group else None,
    )


def iter_blocks(
    phi: Any,
    block_rows: int,
    k: int,
    prefetch: bool = True,
    progress: bool = False,
    desc: str = "pass",
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, block [rows, k] float32)`` for contiguous row blocks of ``phi``.

    ``phi`` is anything sliceable by rows with a ``shape`` (numpy, Zarr, memmap). Columns
    beyond ``k`` are dropped. With ``prefetch`` the next block is read in a background
    thread while the caller works on the current one (Zarr decompression releases the GIL).
    """
    from grasp_cli.progress import Progress

    n = int(phi.shape[0])
    if block_rows < 1:
        raise ValueError(f"block_rows must be positive, got {block_rows}")
    starts = list(range(0, n, block_rows))

    def read(start: int) -> np.ndarray:
        block = np.asarray(phi[start : min(start + block_rows, n), :k])
        if block.dtype != np.float32:
            block = block.astype(np.float32)
        return block

    with Progress(len(starts), desc, "blocks", enabled=progress, min_interval_s=30.0) as bar:
        if not prefetch or len(starts) <= 1:
            for start in starts:
                yield start, read(start)
                bar.update(1)
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(read, starts[0])
            for pos, start in enumerate(starts):
                block = future.result()
                if pos + 1 < len(starts):
                    future = pool.submit(read, starts[pos + 1])
                yield start, block
                bar.update(1)


def row_blocks(array: Any, block_rows: int = BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """Row blocks ``(start, float32 [b, k])`` of a whole sketch array, read ahead."""
    return iter_blocks(array, block_rows, int(array.shape[1]))


def masked_row_sum(array: Any, mask: np.ndarray, dim: int) -> np.ndarray:
    """``Σ_{i: mask[i]} φ_i[:dim]`` (float64 ``[dim]``) in one streamed pass over the sketch array."""
    total = np.zeros(dim)
    for start, block in iter_blocks(array, BLOCK_ROWS, dim):
        total += block[mask[start : start + len(block)]].sum(axis=0, dtype=np.float64)
    return total
