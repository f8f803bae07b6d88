"""DSIR computed by the authors' ``data-selection`` package (``HashedNgramDSIR``) on grasp's rows.

The rows (and each task's rows) are written as JSON lines ``{"id": ..., "text": ...}`` into a
scratch folder (the corpus streamed into files of ``file_rows`` rows: the package holds one
file's per-example weights at a time while computing them), the package fits its importance estimator on all tokens, computes the log
importance weights, and resamples ``budget`` rows balanced over the tasks
(``separate_targets=True`` with equal ``target_proportions``); the selected ids are read back
from its output. ``min_example_length=0``: grasp's units are short fixed-length rows.
The package draws its Gumbel noise from NumPy's global generator, which is seeded here.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from grasp_cli.anchors import missing, quiet_stderr


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
    ``with_weights``) from ``data_selection``; ``texts`` (row i says ``texts[i]``) is read once,
    as a stream."""
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
        weights = (
            np.concatenate(
                [
                    np.load(
                        root / "cache" / "log_importance_weights" / f"{i}.npy", allow_pickle=False
                    )
                    for i in range(len(raw))
                ]
            )
            if with_weights
            else None
        )
        state = np.random.get_state()
        np.random.seed(seed % (2**32))
        try:
            with quiet_stderr():
                dsir.resample(out_dir=str(root / "out"), num_to_sample=budget, top_k=top_k)
        finally:
            np.random.set_state(state)
        chosen = []
        for path in sorted((root / "out").glob("*.jsonl")):
            with open(path, encoding="utf-8") as handle:
                chosen += [json.loads(line)["id"] for line in handle if line.strip()]
    weights = None if weights is None else np.asarray(weights, dtype=np.float64)
    return np.sort(np.asarray(chosen, dtype=np.int64)), weights
