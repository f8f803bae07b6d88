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


@dataclass
class Sketches:
    """An opened ``sketches.zarr``: the streamed matrix and the small arrays, read."""

    path: Path
    group: CheckedGroup
    train: CheckedArray  # [N, k] φ_i, streamed
    ids: np.ndarray  # [N] int64 corpus ids, row order
    residuals: np.ndarray  # [T, k] float64 r_t
    task_names: list[str]
    trak_train: CheckedArray | None = None  # [N, k_t] ψ_i, TRAK's output-gradient features
    trak_q: np.ndarray | None = None  # [N] Q_i, TRAK's out-to-loss weights
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

    def check_ids(self, corpus_ids: np.ndarray, corpus: Path) -> None:
        """The sketch rows must be the corpus rows, in order (else: made from another corpus)."""
        if len(corpus_ids) != self.n or not np.array_equal(self.ids, np.asarray(corpus_ids)):
            raise InputError(
                f"{self.path}: sketch ids do not match the corpus (train_ids do not match "
                f"{corpus}); rerun `grasp sketch`"
            )

    def check_k(self, dims: list[int], what: str) -> None:
        if max(dims, default=0) > self.k:
            raise InputError(
                f"{what} {dims} exceeds the sketch dimension k = {self.k} of {self.path}"
            )


class WeightedRows:
    """Rows ``w_i · a_i`` of an array read lazily by row slices (``shape``, ``a[i:j, :k]``)."""

    def __init__(self, array: Any, weights: np.ndarray) -> None:
        self.array, self.weights = array, np.asarray(weights, dtype=np.float64)
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
        ids=np.asarray(group["train_ids"][:]),
        residuals=np.asarray(group["tasks"][:], dtype=np.float64),
        task_names=[str(t) for t in group["task_names"][:]],
        trak_train=group["trak_train"] if has_trak else None,
        trak_q=np.asarray(group["trak_q"][:], dtype=np.float64) if has_trak else None,
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
