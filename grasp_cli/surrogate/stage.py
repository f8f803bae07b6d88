"""`grasp fit-surrogate`: features from one pass over the sketches, the LCB protocol, evaluation.

Reads ``sketches.zarr``, ``subsets.zarr`` and ``retrain/``; writes ``surrogate/``:
``params.json`` (the chosen model, human-readable, with the noise ceiling),
``model.npz`` (its arrays), ``lcb.parquet``, ``evaluation.parquet``,
``predictions.parquet`` (every method's prediction for every subset) and, when
``surrogate.bootstrap_refits > 0``, ``bootstrap.npz``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from grasp_cli.artifacts.atomic import artifact_dir
from grasp_cli.artifacts.examples import open_corpus
from grasp_cli.artifacts.manifest import build_manifest, folder_digest, require, write_manifest
from grasp_cli.artifacts.tables import write_table
from grasp_cli.artifacts.zarr_io import open_group_read
from grasp_cli.context import StageContext
from grasp_cli.errors import InputError
from grasp_cli.retrain.stage import base_seed, read_results
from grasp_cli.select.stream import iter_blocks
from grasp_cli.surrogate.features import compute_subset_features
from grasp_cli.surrogate.metrics import spearman
from grasp_cli.surrogate.model import GraspSurrogate, float_to_json
from grasp_cli.surrogate.protocol import run_protocol
from grasp_cli.surrogate.store import save_arrays

PHI_BLOCK_ROWS = 65536


def phi_blocks(array, block_rows: int = PHI_BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """Row blocks ``(start, float32 [b, k])`` of a sketch array (Zarr or numpy), read ahead."""
    return iter_blocks(array, block_rows, int(array.shape[1]))


def masked_row_sum(array, mask: np.ndarray, dim: int) -> np.ndarray:
    """``Σ_{i: mask[i]} φ_i[:dim]`` (float64 ``[dim]``) in one streamed pass over the sketch array."""
    total = np.zeros(dim)
    for start, block in iter_blocks(array, PHI_BLOCK_ROWS, dim):
        total += block[mask[start : start + len(block)]].sum(axis=0, dtype=np.float64)
    return total


def measured_utilities(
    results: pa.Table, task_names: list[str], n_subsets: int, seed: int, metric: str = "loss"
) -> np.ndarray:
    """``U`` ``[M, T]`` = −metric of each subset's run with ``seed`` (NaN where absent)."""
    utilities = np.full((n_subsets, len(task_names)), np.nan)
    column = {name: t for t, name in enumerate(task_names)}
    for row in results.to_pylist():
        if row["metric"] == metric and row["seed"] == seed and row["task"] in column:
            utilities[row["subset_id"], column[row["task"]]] = -row["value"]
    return utilities


def noise_ceiling(results: pa.Table, task_names: list[str], n_subsets: int, seed: int) -> dict:
    """Seed-to-seed Spearman of subsets retrained with a second seed, per task and mean; √ρ ceiling."""
    base = measured_utilities(results, task_names, n_subsets, seed)
    other_seeds = sorted({s for s in results.column("seed").to_pylist() if s != seed})
    if not other_seeds:
        return {}
    repeat = measured_utilities(results, task_names, n_subsets, other_seeds[0])
    rows = np.flatnonzero(np.isfinite(repeat).all(axis=1) & np.isfinite(base).all(axis=1))
    if len(rows) < 3:
        return {}
    rho = np.atleast_1d(spearman(base[rows], repeat[rows]))
    mean = float(np.mean(rho))
    return {
        "n_subsets": int(len(rows)),
        "per_task": dict(zip(task_names, map(float, rho), strict=True)),
        "mean": mean,
        "ceiling": math.sqrt(max(mean, 0.0)),
    }


def run_fit_surrogate(ctx: StageContext) -> str:
    layout, config = ctx.layout, ctx.config
    settings = config.surrogate
    for name in ("sketches", "subsets", "retrain"):
        require(layout, name, config, force=ctx.force)
    sketches = open_group_read(layout.sketches, "sketch")
    phi = sketches["train"]
    residuals = np.asarray(sketches["tasks"][:], dtype=np.float64)
    task_names = [str(t) for t in sketches["task_names"][:]]
    if max(settings.k_grid) > phi.shape[1]:
        raise InputError(
            f"surrogate.k_grid {settings.k_grid} exceeds the sketch dimension k = {phi.shape[1]} "
            f"of {layout.sketches}"
        )
    subsets = open_group_read(layout.subsets, "retrain-subsets")
    membership = np.asarray(subsets["membership"][:])
    roles = np.array([str(r) for r in subsets["role"][:]])
    n_rows = int(subsets.attrs["n"])
    if n_rows != phi.shape[0]:
        raise InputError(
            f"{layout.subsets} has N = {n_rows} but {layout.sketches} has {phi.shape[0]} rows; "
            "rerun `grasp retrain-subsets` or `grasp sketch` on the same corpus"
        )
    corpus = open_corpus(layout.corpus)  # ids and domains: columns only
    if not np.array_equal(np.asarray(sketches["train_ids"][:]), corpus.ids):
        raise InputError(
            f"{layout.sketches}: train_ids do not match {layout.corpus}; rerun `grasp sketch`"
        )
    codes, domain_names = corpus.domain_codes()

    results = read_results(layout.retrain)
    seed = base_seed(ctx)
    utilities = measured_utilities(results, task_names, len(roles), seed)
    missing_tasks = [t for t, name in enumerate(task_names) if np.isnan(utilities[:, t]).all()]
    if missing_tasks:
        raise InputError(
            f"{layout.retrain}: no results for task(s) {[task_names[t] for t in missing_tasks]}; "
            "were the tasks changed after retraining?"
        )
    usable = np.isin(roles, ["fit", "eval"])
    bad = np.flatnonzero(usable & ~np.isfinite(utilities).all(axis=1))
    if len(bad) > settings.max_excluded_fraction * usable.sum():
        raise InputError(
            f"{layout.retrain}: {len(bad)} subsets have missing, NaN or infinite utilities "
            f"(e.g. subsets {bad[:8].tolist()}), more than surrogate.max_excluded_fraction allows"
        )
    usable[bad] = False

    features, moments = compute_subset_features(
        membership,
        phi_blocks(phi),
        n_examples=n_rows,
        domains=codes,
        domain_names=domain_names,
        normalized_dims=sorted(set(settings.k_grid)),
        with_overlaps=n_rows <= settings.datamodels_max_n,
    )
    fit_rows = np.flatnonzero(usable & (roles == "fit"))
    eval_rows = np.flatnonzero(usable & (roles == "eval"))
    if len(fit_rows) < 4 or len(eval_rows) < 3:
        raise InputError(
            f"need at least 4 fit and 3 eval subsets with results, have {len(fit_rows)} and "
            f"{len(eval_rows)}; sample more subsets ([subsets] designs)"
        )
    fold_seed = config.derived_seed(settings.seed, "surrogate")
    # Sign convention. φ_i = P∇ℓ(z_i) is a gradient; training on S steps along −m_S, and the first-order
    # gain on task t is ⟨P∇L_t, m_S⟩ = ⟨r_t, −m_S⟩ with r_t = −P∇L_t. The surrogate's alignment term
    # ⟨v_t, m_S⟩ is therefore built on the task *gradient* −r_t, so that a_t ≥ 0 means "aligned helps".
    alignment_targets = -residuals
    result = run_protocol(
        features.take(fit_rows),
        utilities[fit_rows],
        features.take(eval_rows),
        utilities[eval_rows],
        residuals=alignment_targets,
        moments=moments,
        settings=settings,
        seed=fold_seed,
        task_names=task_names,
    )
    if result.skipped:
        for method, reason in result.skipped.items():
            print(f"note: baseline {method} skipped: {reason}")
    model = result.surrogate
    utility_std = np.nanstd(utilities[fit_rows], axis=0)
    noise = noise_ceiling(results, task_names, len(roles), seed)

    prediction_rows = []
    scored = np.concatenate([fit_rows, eval_rows])
    for method, fit in result.fits.items():
        predicted = np.asarray(fit.model.predict(features.take(scored)))
        for position, subset_id in enumerate(scored):
            for t, task in enumerate(task_names):
                prediction_rows.append(
                    {
                        "subset_id": int(subset_id),
                        "role": str(roles[subset_id]),
                        "task": task,
                        "method": method,
                        "predicted": float(predicted[position, t]),
                        "measured": float(utilities[subset_id, t]),
                    }
                )

    with artifact_dir(layout.surrogate) as folder:
        params = {
            "grasp": model.params(),
            "chosen": {
                m: {k: float_to_json(v) if isinstance(v, float) else v for k, v in c.items()}
                for m, c in result.chosen.items()
            },
            "skipped": result.skipped,
            "task_names": task_names,
            "utility": "-(mean task loss, nats); higher is better",
            "utility_std": utility_std.tolist(),
            "n_fit": int(len(fit_rows)),
            "n_eval": int(len(eval_rows)),
            "excluded_subsets": bad.tolist(),
            "noise": noise,
            "lcb_delta": settings.delta,
        }
        (folder / "params.json").write_text(
            json.dumps(params, indent=2, default=str), encoding="utf-8"
        )
        save_arrays(folder / "model.npz", model.to_arrays())
        write_table(folder / "lcb.parquet", pa.Table.from_pylist(result.lcb_rows))
        write_table(folder / "evaluation.parquet", pa.Table.from_pylist(result.evaluation_rows))
        write_table(folder / "predictions.parquet", pa.Table.from_pylist(prediction_rows))
        designs = np.array([str(d) for d in subsets["design"][:]])
        by_design = evaluation_by_design(prediction_rows, designs, task_names)
        if by_design:
            write_table(folder / "evaluation_by_design.parquet", pa.Table.from_pylist(by_design))
        if settings.bootstrap_refits > 0:
            save_arrays(
                folder / "bootstrap.npz",
                bootstrap_refits(
                    model,
                    features.take(fit_rows),
                    utilities[fit_rows],
                    moments,
                    settings.bootstrap_refits,
                    config.derived_seed(-1, "bootstrap-refits"),
                ),
            )
        write_manifest(
            folder,
            build_manifest(
                layout,
                "surrogate",
                config,
                content=folder_digest(folder),
                seeds={"folds": fold_seed},
                extra={"n_fit": int(len(fit_rows)), "n_eval": int(len(eval_rows))},
            ),
        )
    return summary_text(
        result.evaluation_rows, model, noise, len(fit_rows), len(eval_rows), layout.surrogate
    )


def evaluation_by_design(
    prediction_rows: list[dict], designs: np.ndarray, task_names: list[str], min_subsets: int = 5
) -> list[dict]:
    """Held-out Spearman per method restricted to the eval subsets of each design (mean over tasks).

    Mixture-shaped subsets reward knowing the domain mix; fixed-size ``within`` subsets only
    differ in *which* examples they hold, where example-level methods must do the work.
    """
    rows = []
    eval_rows = [r for r in prediction_rows if r["role"] == "eval"]
    for design in sorted(set(designs.tolist())):
        chosen = [r for r in eval_rows if designs[r["subset_id"]] == design]
        n_eval = len({r["subset_id"] for r in chosen})
        if n_eval < min_subsets:
            continue
        for method in sorted({r["method"] for r in chosen}):
            per_task = []
            for task in task_names:
                picked = [r for r in chosen if r["method"] == method and r["task"] == task]
                predicted = np.array([r["predicted"] for r in picked])
                measured = np.array([r["measured"] for r in picked])
                per_task.append(float(spearman(predicted, measured)))
            rows.append(
                {
                    "method": method,
                    "design": design,
                    "spearman": float(np.mean(per_task)),
                    "n_eval": n_eval,
                }
            )
    return rows


def bootstrap_refits(
    model: GraspSurrogate, features, utilities: np.ndarray, moments, count: int, seed: int
) -> dict[str, np.ndarray]:
    """The chosen candidate refit on ``count`` bootstrap resamples of the fit subsets."""
    rng = np.random.default_rng(seed)
    linear, curvature, intercepts = [], [], []
    for _ in range(count):
        rows = rng.choice(len(features), size=len(features), replace=True)
        refit = GraspSurrogate(
            model.residuals,
            k_prime=model.k_prime,
            geometry=model.geometry,
            ridge=model.ridge,
            aggregation=model.aggregation,
            moments=moments,
            task_names=model.task_names,
        ).fit(features.take(rows), utilities[rows])
        linear.append(refit.linear_vectors)
        curvature.append(refit.curvature_)
        intercepts.append(refit.intercepts_)
    return {
        "linear": np.stack(linear),
        "curvature": np.stack(curvature),
        "intercepts": np.stack(intercepts),
    }


def summary_text(rows, model, noise, n_fit, n_eval, folder) -> str:
    full = {}
    for row in rows:
        if row["task"] == "mean" and row["n_fit"] == n_fit:
            full[row["method"]] = row
    lines = [
        f"fit-surrogate: {n_fit} fit / {n_eval} eval subsets; chosen GRASP: k'={model.k_prime}, "
        f"alignment={model.alignment}, "
        f"G={model.geometry}, λ={model.ridge}, {model.aggregation}"
    ]
    if noise:
        lines.append(
            f"  noise ceiling: seed-to-seed ρ={noise['mean']:.3f} (√ρ={noise['ceiling']:.3f})"
        )
    for method, row in sorted(
        full.items(), key=lambda item: -np.nan_to_num(item[1]["spearman"], nan=-2)
    ):
        lines.append(
            f"  {method:<12} spearman {row['spearman']:+.3f} [{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]"
        )
    lines.append(f"  -> {folder}")
    return "\n".join(lines)
