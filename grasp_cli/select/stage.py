"""`grasp select`: the budget-B subset with the best predicted utility -> ``RUN/selection/``.

Writes ``selected.parquet`` (id, rank, gain, domain) and, for the curation check,
``curation.parquet`` (selection, id) with the GRASP selection, a seeded random
selection and the additive top-B selection of the same size.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from grasp_cli.artifacts.atomic import artifact_dir
from grasp_cli.artifacts.examples import open_corpus
from grasp_cli.artifacts.manifest import build_manifest, folder_digest, require, write_manifest
from grasp_cli.artifacts.tables import write_table
from grasp_cli.artifacts.zarr_io import open_group_read
from grasp_cli.context import StageContext
from grasp_cli.errors import InputError
from grasp_cli.select import (
    additive_top_b,
    budget_count,
    domain_caps,
    objective_from_bootstrap,
    objective_from_tasks,
    select,
)
from grasp_cli.select.export import export_mode, write_export
from grasp_cli.select.objective import aggregation_scale
from grasp_cli.surrogate.stage import masked_row_sum
from grasp_cli.surrogate.store import StoredSurrogate, load_surrogate


def build_objective(stored: StoredSurrogate, ctx: StageContext, budget: int):
    """F(S) = Σ_t w_t Û_t(S)/σ_t from the fitted surrogate (σ_t: std of measured fit utilities)."""
    section = ctx.config.select
    model = stored.model
    unknown = sorted(set(section.task_weights) - set(model.task_names))
    if unknown:
        raise InputError(
            f"select.task_weights names unknown task(s) {unknown}; tasks: {model.task_names}"
        )
    weights = np.array([section.task_weights.get(name, 1.0) for name in model.task_names])
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise InputError(f"select.task_weights must be finite and >= 0, got {section.task_weights}")
    if not weights.sum() > 0:
        raise InputError(
            "select.task_weights gives every task weight 0: nothing to select for; "
            "give at least one task a positive weight"
        )
    sigma = np.where(stored.utility_std > 0, stored.utility_std, 1.0)
    scale = aggregation_scale(model.aggregation, budget, sum_scale=1.0 / float(model.n_ref_))
    if section.robust == "bootstrap":
        if stored.bootstrap is None:
            raise InputError(
                "select.robust = 'bootstrap' needs bootstrap refits; refit with surrogate.bootstrap_refits > 0"
            )
        boot = stored.bootstrap
        refits = [
            (
                boot["linear"][r],
                boot["curvature"][r][:, None, None] * model.metric_[None],
                boot["intercepts"][r],
            )
            for r in range(boot["linear"].shape[0])
        ]
        return objective_from_bootstrap(refits, scale, weights, sigma, section.robust_kappa)
    quadratic = np.stack([model.quadratic_matrix(t) for t in range(model.n_tasks)])
    return objective_from_tasks(
        model.linear_vectors,
        quadratic,
        model.intercepts_,
        scale,
        weights,
        sigma,
        robust=section.robust,
        kappa=section.robust_kappa,
    )


def run_select(ctx: StageContext, export=None) -> str:
    layout, section = ctx.layout, ctx.config.select
    require(layout, "sketches", ctx.config, force=ctx.force)
    require(layout, "surrogate", ctx.config, force=ctx.force)
    if export is not None:  # refuse a bad target before any work (and before touching selection/)
        export_mode(export, layout, ctx.force)
    stored = load_surrogate(layout.surrogate)
    sketches = open_group_read(layout.sketches, "sketch")
    phi = sketches["train"]
    ids = np.asarray(sketches["train_ids"][:])
    corpus = open_corpus(layout.corpus)  # ids and domains: columns only
    if len(corpus) != phi.shape[0] or not np.array_equal(corpus.ids, ids):
        raise InputError(
            f"{layout.sketches}: sketch ids do not match {layout.corpus}; rerun `grasp sketch`"
        )
    budget = budget_count(section.budget, len(ids))
    codes, names = corpus.domain_codes()
    caps = domain_caps(section.domain_caps, names, budget) if section.domain_caps else None
    objective = build_objective(stored, ctx, budget)
    selection = select(
        phi,
        objective,
        budget,
        section.algorithm,
        codes,
        caps,
        section.greedy_max_n,
        section.max_iters,
        section.block_rows,
        ctx.progress,
    )
    rows = np.asarray(selection.indices)
    with artifact_dir(layout.selection) as folder:
        table = pa.table(
            {
                "id": pa.array(ids[rows], pa.int64()),
                "rank": pa.array(np.arange(1, len(rows) + 1), pa.int64()),
                "gain": pa.array(np.asarray(selection.gains, dtype=np.float64)),
                "domain": pa.array([names[c] for c in codes[rows]], pa.string()),
            }
        )
        write_table(folder / "selected.parquet", table)
        extra = {
            "budget": budget,
            "algorithm": selection.algorithm,
            "passes": selection.passes,
            "converged": bool(selection.converged),
            "objective": float(selection.value),
            "history": list(selection.history)[:100],
        }
        if section.curation:
            additive = additive_top_b(phi, objective, budget, codes, caps, progress=False)
            seed = ctx.config.derived_seed(-1, "curation-random")
            random_rows = np.sort(
                np.random.default_rng(seed).choice(len(ids), size=budget, replace=False)
            )
            chosen = {
                "grasp": rows,
                "random": random_rows,
                "additive": np.asarray(additive.indices),
            }
            write_table(
                folder / "curation.parquet",
                pa.table(
                    {
                        "selection": pa.array(
                            [n for n, r in chosen.items() for _ in r], pa.string()
                        ),
                        "id": pa.array(
                            np.concatenate([ids[r] for r in chosen.values()]), pa.int64()
                        ),
                    }
                ),
            )
            extra["additive_objective"] = float(additive.value)
            extra["random_objective"] = float(
                objective.value(
                    masked_row_sum(phi, np.isin(np.arange(len(ids)), random_rows), objective.dim)
                )
            )
        write_manifest(
            folder,
            build_manifest(
                layout, "selection", ctx.config, content=folder_digest(folder), extra=extra
            ),
        )
    message = (
        f"select: {budget} of {len(ids)} examples by {selection.algorithm} "
        f"({selection.passes} passes, converged={selection.converged}), F = {selection.value:.4g}"
    )
    if export is not None:
        mode = write_export(
            export,
            layout,
            (len(rows), corpus.iter_rows(np.sort(rows), ctx.config.prepare.row_group_rows)),
            force=ctx.force,
            shard_rows=ctx.config.prepare.shard_rows,
            row_group_rows=ctx.config.prepare.row_group_rows,
            provenance={"run": str(layout.root.resolve()), "budget": budget},
        )
        message += f"; exported to {export}" + (
            " (added beside existing files)" if mode == "add" else ""
        )
    return message + f" -> {layout.selection / 'selected.parquet'}"
