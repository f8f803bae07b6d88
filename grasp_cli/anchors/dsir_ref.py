"""DSIR computed by the authors' ``data-selection`` package (``HashedNgramDSIR``) on grasp's rows.

The rows (and each task's rows) are written as JSON lines ``{"id": ..., "text": ...}`` into a
scratch folder (the corpus streamed into files of ``file_rows`` rows: the package holds one
file's per-example weights at a time while computing them); the package fits its importance
estimator on all tokens and computes the log importance weights, one ``.npy`` per file.
``separate_targets=True`` with equal ``target_proportions``: ``budget`` rows balanced over the
tasks. ``min_example_length=0``: grasp's units are short fixed-length rows.

The resampling step is the package's ``resample`` replayed as a stream
(:func:`package_resample_rows`): the package concatenates all N×T weights and draws N Gumbel
keys at once (memory linear in the corpus), then re-reads the raw files to write the chosen
rows. Its draw is ``np.random.gumbel(size=m)`` over the m rows still eligible, from NumPy's
legacy generator seeded with ``seed``; MT19937 Gumbel draws are sequential, so drawing them file
by file gives the same keys, and a running top-``B_t`` (``StreamingTopB``) over the same keys
gives the same rows in O(B) memory. A test runs the package's own ``resample`` beside it.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from grasp_cli.anchors import missing, quiet_stderr
from grasp_cli.artifacts.examples import read_npy_header


def _write_jsonl(path: Path, ids: Iterable[int], texts: Iterable[str]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for example_id, text in zip(ids, texts, strict=True):
            handle.write(json.dumps({"id": int(example_id), "text": text}) + "\n")


def _write_raw_files(
    root: Path, ids: np.ndarray, texts: Iterable[str], file_rows: int
) -> list[str]:
    """The corpus as ``raw-00000.jsonl``, ... of at most ``file_rows`` rows each."""
    paths: list[str] = []
    handle = None
    written = 0
    try:
        for text in texts:
            if written % file_rows == 0:
                if handle is not None:
                    handle.close()
                paths.append(str(root / f"raw-{len(paths):05d}.jsonl"))
                handle = open(paths[-1], "w", encoding="utf-8")  # noqa: SIM115
            handle.write(json.dumps({"id": int(ids[written]), "text": text}) + "\n")
            written += 1
    finally:
        if handle is not None:
            handle.close()
    if written != len(ids):
        raise ValueError(f"{written} texts for {len(ids)} ids")
    return paths


@contextlib.contextmanager
def fitted_package(
    ids: np.ndarray,
    texts: Iterable[str],
    target_texts: dict[str, Sequence[str]],
    scratch: Path | None = None,
    file_rows: int = 65_536,
) -> Iterator[Any]:
    """The package's ``HashedNgramDSIR`` fitted on all tokens with its log importance weights
    computed (one ``.npy`` per raw file), in a scratch folder removed on exit. ``texts``
    (row i says ``texts[i]``) is read once, as a stream; targets are in sorted name order."""
    try:
        import data_selection as package
    except ImportError:
        raise missing("data-selection", "DSIR (dsir-ref)") from None
    with tempfile.TemporaryDirectory(dir=scratch) as folder:
        root = Path(folder)
        raw = _write_raw_files(root, np.asarray(ids), texts, file_rows)
        targets = []
        for name in sorted(target_texts):
            path = root / f"target-{len(targets)}.jsonl"
            _write_jsonl(path, range(len(target_texts[name])), target_texts[name])
            targets.append(str(path))
        dsir = package.HashedNgramDSIR(
            raw_datasets=raw,
            target_datasets=targets,
            cache_dir=str(root / "cache"),
            num_proc=1,
            min_example_length=0,
            separate_targets=True,
            target_proportions=[1.0] * len(targets),
        )
        with quiet_stderr():  # the package draws tqdm bars; grasp reports its own progress
            dsir.fit_importance_estimator(num_tokens_to_fit="all")
            dsir.compute_importance_weights()
        yield dsir


def _package_shards(dsir: Any) -> list[tuple[Path, int, np.ndarray]]:
    """Per raw-file shard, in the package's order: ``(its log weights file [n_f, T], n_f,
    eligible [n_f] bool from the package's own metadata filter)``. Weights are read when used:
    pages of a file kept mapped would stay resident, N·T·8 bytes in all."""
    shards = []
    for shard in dsir._get_virtually_sharded_datasets(dsir.raw_datasets):
        name = f"{shard['overall_idx']}.npy"
        path = Path(dsir.log_importance_weights_dir) / name
        with open(path, "rb") as handle:
            rows = read_npy_header(handle)[0][0]
        meta = Path(dsir.perexample_metadata_dir) / name
        eligible = np.ones(rows, dtype=bool)
        if meta.exists():
            lengths = np.load(meta, allow_pickle=False)
            eligible = np.asarray(dsir.perexample_metadata_filter(lengths), dtype=bool)
        shards.append((path, rows, eligible))
    return shards


def package_resample_rows(dsir: Any, budget: int, seed: int, top_k: bool = False) -> np.ndarray:
    """Row positions (sorted) that ``dsir.resample(num_to_sample=budget, top_k=top_k)`` picks
    after ``np.random.seed(seed)``, computed a file at a time in O(budget) memory.

    As the package (``separate_targets``): target t takes ``B_t = int(B·p_t)`` rows (the last
    takes the remainder), the top ``B_t`` of ``log w_it + G_i`` over the rows still eligible
    (passing its metadata filter, not taken by an earlier target), ``G`` one Gumbel key per
    eligible row in row order (none with ``top_k``). Same rows as the package; where keys tie
    exactly (only possible with ``top_k``) the lower row wins, the package leaves it to
    ``argpartition``.
    """
    from grasp_cli.select.stream import StreamingTopB

    shards = _package_shards(dsir)
    proportions = np.asarray(dsir.target_proportions, dtype=np.float64)
    counts = [int(budget * p) for p in proportions]
    counts[-1] += budget - sum(counts)
    rng = np.random.RandomState(seed % (2**32))  # = the global generator after np.random.seed
    taken = np.empty(0, dtype=np.int64)
    for target, count in enumerate(counts):
        if count == 0:
            continue
        top = StreamingTopB(count, keep_rows=False)
        start = 0
        for path, count_f, eligible in shards:
            rows = np.arange(start, start + count_f, dtype=np.int64)
            keep = eligible & ~np.isin(rows, taken, assume_unique=True)
            keys = np.load(path, allow_pickle=False)[:, target].astype(np.float64)[keep]
            if not top_k:
                keys += rng.gumbel(size=keys.shape)
            top.push(rows[keep], keys)
            start += count_f
        chosen, _ = top.result()
        taken = np.union1d(taken, chosen)
    return taken


def dsir_reference(
    ids: np.ndarray,
    texts: Iterable[str],
    target_texts: dict[str, Sequence[str]],
    budget: int,
    seed: int,
    top_k: bool = False,
    scratch: Path | None = None,
    file_rows: int = 65_536,
    with_weights: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(selected ids sorted, log importance weights ``[N, T]`` or None without
    ``with_weights``) from ``data_selection``'s weights and its resampling rule
    (:func:`package_resample_rows`); ``texts`` (row i says ``texts[i]``) is read once, as a
    stream."""
    with fitted_package(ids, texts, target_texts, scratch, file_rows) as dsir:
        weights = (
            np.concatenate(
                [np.load(path, allow_pickle=False) for path, _, _ in _package_shards(dsir)]
            )
            if with_weights
            else None
        )
        rows = package_resample_rows(dsir, budget, seed, top_k)
    return np.sort(np.asarray(ids, dtype=np.int64)[rows]), weights
