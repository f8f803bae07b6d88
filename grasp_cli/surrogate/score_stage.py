"""`grasp score`: predicted utility of subsets, and each example's marginal gain -> ``RUN/scores/``.

Units: one per ``score.chunk_rows`` rows of examples (``examples/part-NNNNN.parquet``
with id, task, gain, alignment, redundancy) plus one for ``subsets.parquet``
(subset_id, role, size, task, predicted, alignment, penalty). Sharded like
every heavy stage; a rerun only scores missing parts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from grasp_cli.artifacts.manifest import file_digest, require
from grasp_cli.artifacts.sharded import finish_if_complete, open_sharded
from grasp_cli.artifacts.shards import UnitMarkers, owned_units
from grasp_cli.artifacts.tables import read_table, require_columns, write_table
from grasp_cli.artifacts.zarr_io import open_group_read
from grasp_cli.context import StageContext
from grasp_cli.errors import InputError
from grasp_cli.surrogate.features import compute_subset_features
from grasp_cli.surrogate.gains import surrogate_gains
from grasp_cli.surrogate.stage import masked_row_sum, phi_blocks
from grasp_cli.surrogate.store import load_surrogate


def given_membership(path: Path, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bit-packed membership ``[M, ceil(N/8)]`` and subset ids from a (subset_id, id) Parquet file."""
    table = read_table(path)
    require_columns(table, path, {"subset_id": "int", "id": "int"})
    position = {int(i): row for row, i in enumerate(ids)}
    subset_ids = table.column("subset_id").to_numpy()
    example_ids = table.column("id").to_numpy()
    unknown = sorted({int(i) for i in example_ids if int(i) not in position})
    if unknown:
        raise InputError(f"{path}: {len(unknown)} ids are not in the corpus, e.g. {unknown[:10]}")
    names = np.unique(subset_ids)
    mask = np.zeros((len(names), len(ids)), dtype=bool)
    lookup = {int(s): j for j, s in enumerate(names)}
    for subset, example in zip(subset_ids, example_ids, strict=True):
        mask[lookup[int(subset)], position[int(example)]] = True
    return np.packbits(mask, axis=1), names


def run_score(ctx: StageContext) -> str:
    layout, config = ctx.layout, ctx.config
    require(layout, "sketches", config, force=ctx.force)
    require(layout, "surrogate", config, force=ctx.force)
    stored = load_surrogate(layout.surrogate)
    model = stored.model
    sketches = open_group_read(layout.sketches, "sketch")
    phi = sketches["train"]
    ids = np.asarray(sketches["train_ids"][:])
    n_rows, k_prime = phi.shape[0], model.k_prime
    chunk = config.score.chunk_rows
    n_chunks = -(-n_rows // chunk)

    def skeleton(folder: Path) -> None:
        (folder / "examples").mkdir()

    manifest = open_sharded(
        ctx,
        "scores",
        skeleton,
        units=n_chunks + 1,
        extra={"reference": config.score.reference, "k": k_prime},
    )
    folder = layout.scores
    markers = UnitMarkers(folder)
    todo = [u for u in owned_units(n_chunks + 1, ctx.shard) if ctx.force or not markers.is_done(u)]
    if any(u < n_chunks for u in todo):
        mask = reference_mask(ctx, ids)
        reference_sum = masked_row_sum(phi, mask, k_prime)
        reference_size = float(mask.sum())
    for unit in todo:
        if unit == n_chunks:
            part = folder / "subsets.parquet"
            write_table(part, subset_predictions(ctx, model, phi, ids))
        else:
            start, stop = unit * chunk, min((unit + 1) * chunk, n_rows)
            block = np.asarray(phi[start:stop, :k_prime], dtype=np.float64)
            gains = surrogate_gains(
                model,
                block,
                reference_sum=reference_sum,
                reference_size=reference_size,
                in_reference=mask[start:stop],
            )
            tasks = model.task_names
            count = stop - start
            part = folder / "examples" / f"part-{unit:05d}.parquet"
            write_table(
                part,
                pa.table(
                    {
                        "id": pa.array(np.repeat(ids[start:stop], len(tasks)), pa.int64()),
                        "task": pa.array(
                            np.tile(np.array(tasks, dtype=object), count).tolist(), pa.string()
                        ),
                        "gain": pa.array(gains.gain.reshape(-1)),
                        "alignment": pa.array(gains.alignment.reshape(-1)),
                        "redundancy": pa.array(gains.redundancy.reshape(-1)),
                    }
                ),
            )
        markers.mark_done(unit, files={part.relative_to(folder).as_posix(): file_digest([part])})
    complete = finish_if_complete(folder, manifest)
    left = len(markers.missing(n_chunks + 1))
    return f"score: {len(todo)} parts written; " + (
        f"{folder} complete" if complete else f"{left} parts left"
    )


def reference_mask(ctx: StageContext, ids: np.ndarray) -> np.ndarray:
    """Rows of the reference set R: the whole corpus, or the current selection."""
    if ctx.config.score.reference == "corpus":
        return np.ones(len(ids), dtype=bool)
    require(ctx.layout, "selection", ctx.config, force=ctx.force)
    selected = read_table(ctx.layout.selection / "selected.parquet").column("id").to_numpy()
    return np.isin(ids, selected)


def subset_predictions(ctx: StageContext, model, phi, ids: np.ndarray) -> pa.Table:
    if ctx.config.score.subsets:
        membership, subset_ids = given_membership(Path(ctx.config.score.subsets), ids)
        roles = np.array(["given"] * len(subset_ids))
    else:
        require(ctx.layout, "subsets", ctx.config, force=ctx.force)
        group = open_group_read(ctx.layout.subsets, "retrain-subsets")
        membership = np.asarray(group["membership"][:])
        subset_ids = np.arange(membership.shape[0])
        roles = np.array([str(r) for r in group["role"][:]])
    features, _ = compute_subset_features(membership, phi_blocks(phi), n_examples=len(ids))
    terms = model.terms(features)
    predicted = terms["intercept"] + terms["alignment"] - terms["penalty"]
    tasks = model.task_names
    m = len(subset_ids)
    return pa.table(
        {
            "subset_id": pa.array(np.repeat(subset_ids, len(tasks)), pa.int64()),
            "role": pa.array(np.repeat(roles, len(tasks)).tolist(), pa.string()),
            "size": pa.array(np.repeat(features.sizes.astype(np.int64), len(tasks)), pa.int64()),
            "task": pa.array(np.tile(np.array(tasks, dtype=object), m).tolist(), pa.string()),
            "predicted": pa.array(predicted.reshape(-1)),
            "alignment": pa.array(terms["alignment"].reshape(-1)),
            "penalty": pa.array(terms["penalty"].reshape(-1)),
        }
    )
