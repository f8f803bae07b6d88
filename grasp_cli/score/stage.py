"""`grasp score`: predicted utility of subsets, and each example's marginal gain -> ``RUN/scores/``.

Units: one per ``score.chunk_rows`` rows of examples (``examples/part-NNNNN.parquet`` with
id, task, utility_gain, alignment, redundancy) plus one for ``subsets.parquet`` (subset_id,
role, size, task, predicted_utility, alignment, redundancy). Everything is in utility units
(−task loss; higher is better), with one sign convention: value = alignment − redundancy
(+ the intercept for a subset's predicted utility). Sharded through ``runner.run_units`` like every
heavy stage; a rerun only scores missing parts. The ``--subsets`` table is read and checked
before anything is written, so a bad file never touches finished scores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from grasp_cli.artifacts.manifest import file_digest, require
from grasp_cli.artifacts.sketches import BLOCK_ROWS, masked_row_sum, open_sketches, row_blocks
from grasp_cli.artifacts.subsets import pack_membership, read_subset_table, read_subsets
from grasp_cli.artifacts.tables import read_table, write_table
from grasp_cli.context import StageContext
from grasp_cli.runner import run_units
from grasp_cli.surrogate.features import compute_subset_features
from grasp_cli.surrogate.gains import surrogate_gains
from grasp_cli.surrogate.store import load_surrogate


def subsets_to_score(
    ctx: StageContext, ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed membership ``[M, ceil(N/8)]``, subset ids ``[M]``, roles ``[M]``): the
    ``--subsets`` table, or the sampled subsets of ``subsets.zarr``."""
    if ctx.config.score.subsets:
        masks, _, _, subset_ids = read_subset_table(Path(ctx.config.score.subsets), ids)
        return pack_membership(masks), subset_ids, np.array(["given"] * len(subset_ids))
    require(ctx.layout, "subsets", ctx.config, force=ctx.force)
    subsets = read_subsets(ctx.layout.subsets)
    return subsets.membership, np.arange(subsets.m), subsets.roles


def reference_mask(ctx: StageContext, ids: np.ndarray) -> np.ndarray:
    """Rows of the reference set R: the whole corpus, or the current selection."""
    if ctx.config.score.reference == "corpus":
        return np.ones(len(ids), dtype=bool)
    require(ctx.layout, "selection", ctx.config, force=ctx.force)
    selected = read_table(ctx.layout.selection / "selected.parquet").column("id").to_numpy()
    mask = np.zeros(len(ids), dtype=bool)
    for start in range(0, len(ids), BLOCK_ROWS):  # ids block by block: never N of them held
        block = ids[start : start + BLOCK_ROWS]
        mask[start : start + len(block)] = np.isin(block, selected)
    return mask


def subset_predictions(
    model, phi, membership: np.ndarray, subset_ids: np.ndarray, roles: np.ndarray, n: int
) -> pa.Table:
    """The surrogate's prediction for each subset, split into alignment and penalty."""
    features, _ = compute_subset_features(membership, row_blocks(phi), n_examples=n)
    if model.feature_set != "sketch":  # ``phi`` holds the model's own feature rows (Q_i ψ_i)
        features.sets[model.feature_set] = features.sums
    terms = model.terms(features)
    # One sign convention with the examples' table: utility = intercept + alignment − redundancy.
    predicted = terms["intercept"] + terms["alignment"] - terms["penalty"]
    tasks = model.task_names
    m = len(subset_ids)
    return pa.table(
        {
            "subset_id": pa.array(np.repeat(subset_ids, len(tasks)), pa.int64()),
            "role": pa.array(np.repeat(roles, len(tasks)).tolist(), pa.string()),
            "size": pa.array(np.repeat(features.sizes.astype(np.int64), len(tasks)), pa.int64()),
            "task": pa.array(np.tile(np.array(tasks, dtype=object), m).tolist(), pa.string()),
            "predicted_utility": pa.array(predicted.reshape(-1)),
            "alignment": pa.array(terms["alignment"].reshape(-1)),
            "redundancy": pa.array(terms["penalty"].reshape(-1)),
        }
    )


def example_gain_table(model, block: np.ndarray, ids: np.ndarray, **reference) -> pa.Table:
    """Each example's marginal gain against the reference set, per task (rows id × task)."""
    gains = surrogate_gains(model, block, **reference)
    tasks = model.task_names
    return pa.table(
        {
            "id": pa.array(np.repeat(ids, len(tasks)), pa.int64()),
            "task": pa.array(
                np.tile(np.array(tasks, dtype=object), len(ids)).tolist(), pa.string()
            ),
            "utility_gain": pa.array(gains.gain.reshape(-1)),
            "alignment": pa.array(gains.alignment.reshape(-1)),
            "redundancy": pa.array(gains.redundancy.reshape(-1)),
        }
    )


def run_score(ctx: StageContext) -> str:
    layout, config = ctx.layout, ctx.config
    require(layout, "sketches", config, force=ctx.force)
    require(layout, "surrogate", config, force=ctx.force)
    model = load_surrogate(layout.surrogate).model
    sketches = open_sketches(layout.sketches)
    phi, ids = sketches.matrix(model.feature_set), sketches.ids
    n_rows, k_prime = sketches.n, model.k_prime
    # Inputs are read and validated before the artifact is opened: a bad file changes nothing.
    membership, subset_ids, roles = subsets_to_score(ctx, ids)
    chunk = config.score.chunk_rows
    n_chunks = -(-n_rows // chunk)
    reference: dict = {}

    def work(units: list[int]) -> list[dict]:
        (unit,) = units
        folder = layout.scores
        if unit == n_chunks:
            part = folder / "subsets.parquet"
            write_table(part, subset_predictions(model, phi, membership, subset_ids, roles, n_rows))
        else:
            if not reference:  # Σ φ over R: one streamed pass, only if a gain part is to be done
                mask = reference_mask(ctx, ids)
                reference.update(
                    reference_sum=masked_row_sum(phi, mask, k_prime),
                    reference_size=float(mask.sum()),
                    mask=mask,
                )
            start, stop = unit * chunk, min((unit + 1) * chunk, n_rows)
            block = np.asarray(phi[start:stop, :k_prime], dtype=np.float64)
            part = folder / "examples" / f"part-{unit:05d}.parquet"
            write_table(
                part,
                example_gain_table(
                    model,
                    block,
                    ids[start:stop],
                    reference_sum=reference["reference_sum"],
                    reference_size=reference["reference_size"],
                    in_reference=reference["mask"][start:stop],
                ),
            )
        return [{"files": {part.relative_to(folder).as_posix(): file_digest([part])}}]

    def skeleton(folder: Path) -> None:
        (folder / "examples").mkdir()

    report = run_units(
        ctx,
        "scores",
        n_chunks + 1,
        work,
        skeleton=skeleton,
        extra={"reference": config.score.reference, "k": k_prime},
        unit_name="parts",
    )
    return f"score: {len(report.done)} parts written; " + (
        f"{report.folder} complete" if report.complete else f"{report.left} parts left"
    )
