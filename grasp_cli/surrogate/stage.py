"""`grasp fit-surrogate`: features from one pass over the sketches, the LCB protocol, evaluation.

Read → compute → write:

- ``load_fit_inputs`` reads ``sketches.zarr``, ``subsets.zarr``, ``retrain/`` and the corpus
  ids/domains, checks that they describe the same corpus, and computes every subset's
  features in one streamed pass over the sketch matrix;
- ``fit_surrogate`` (pure: arrays in, tables out) runs the LCB protocol for GRASP and every
  baseline on the fit subsets, evaluates on the eval subsets, and builds every output table;
- ``write_fit_outputs`` writes ``surrogate/``: ``params.json`` (the chosen model,
  human-readable, with the noise ceiling), ``model.npz`` (its arrays), ``lcb.parquet``,
  ``evaluation.parquet``, ``evaluation_by_design.parquet``, ``predictions.parquet`` (every
  method's prediction for every subset) and, when ``surrogate.bootstrap_refits > 0``,
  ``bootstrap.npz``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from grasp_cli.artifacts.atomic import artifact_dir
from grasp_cli.artifacts.examples import open_corpus
from grasp_cli.artifacts.manifest import build_manifest, folder_digest, require, write_manifest
from grasp_cli.artifacts.results import read_results, utilities
from grasp_cli.artifacts.sketches import open_sketches, row_blocks
from grasp_cli.artifacts.subsets import read_subsets
from grasp_cli.artifacts.tables import write_table
from grasp_cli.context import StageContext
from grasp_cli.errors import InputError
from grasp_cli.progress import progress_steps
from grasp_cli.surrogate.features import CorpusMoments, SubsetFeatures, compute_subset_features
from grasp_cli.surrogate.metrics import spearman
from grasp_cli.surrogate.model import GraspSurrogate, float_to_json
from grasp_cli.surrogate.protocol import (
    FeatureSet,
    ProtocolResult,
    compare_methods,
    run_protocol,
)
from grasp_cli.surrogate.store import save_arrays


@dataclass
class FitInputs:
    """Everything ``fit_surrogate`` needs, read from the run: arrays, no files."""

    features: SubsetFeatures  # every subset of subsets.zarr (all feature sets' sums)
    moments: CorpusMoments
    residuals: np.ndarray  # [T, k] r_t
    trak: FeatureSet | None  # TRAK's features (targets ψ_t, moments with the unweighted kernel)
    task_names: list[str]
    roles: np.ndarray  # [M] fit | eval | given
    designs: np.ndarray  # [M]
    utilities: np.ndarray  # [M, T] −loss of the base-seed run (NaN where missing)
    repeat_utilities: np.ndarray | None  # [M, T] the same with the first other seed, if any
    loop_rounds: list[int]  # closed-loop rounds whose subsets are among the fit subsets


def load_fit_inputs(ctx: StageContext) -> FitInputs:
    layout, config = ctx.layout, ctx.config
    settings = config.surrogate
    for name in ("sketches", "subsets", "retrain"):
        require(layout, name, config, force=ctx.force)
    sketches = open_sketches(layout.sketches)
    sketches.check_k(list(settings.k_grid), "surrogate.k_grid")
    subsets = read_subsets(layout.subsets)
    if subsets.n != sketches.n:
        raise InputError(
            f"{layout.subsets} has N = {subsets.n} but {layout.sketches} has {sketches.n} rows; "
            "rerun `grasp retrain-subsets` or `grasp sketch` on the same corpus"
        )
    corpus = open_corpus(layout.corpus)  # ids and domains: columns only
    sketches.check_ids(corpus)
    codes, domain_names = corpus.domain_codes()
    results = read_results(layout.retrain)
    seed = ctx.config.seed("retrain")
    measured = utilities(results, sketches.task_names, subsets.m, seed)
    missing_tasks = [
        name for t, name in enumerate(sketches.task_names) if np.isnan(measured[:, t]).all()
    ]
    if missing_tasks:
        raise InputError(
            f"{layout.retrain}: no results for task(s) {missing_tasks}; "
            "were the tasks changed after retraining?"
        )
    other_seeds = sorted({s for s in results.column("seed").to_pylist() if s != seed})
    repeat = (
        utilities(results, sketches.task_names, subsets.m, other_seeds[0]) if other_seeds else None
    )
    # Closed-loop rounds: more fit subsets, near the proposals (never eval subsets).
    from grasp_cli.retrain.loop import finished_rounds, load_round, round_folder

    membership, roles, designs = subsets.membership, subsets.roles, subsets.design
    loop_rounds = finished_rounds(layout.path("loop"))
    for number in loop_rounds:
        folder = round_folder(layout.path("loop"), number)
        loaded = load_round(folder, subsets.n)
        rows = utilities(read_results(folder), sketches.task_names, len(loaded["membership"]), seed)
        membership = np.concatenate([membership, loaded["membership"]])
        roles = np.concatenate([roles, np.array(["fit"] * len(rows))])
        designs = np.concatenate([designs, np.array([f"loop-{number}"] * len(rows))])
        measured = np.concatenate([measured, rows])
        if repeat is not None:
            repeat = np.concatenate([repeat, np.full_like(rows, np.nan)])
    features, moments = compute_subset_features(
        membership,
        row_blocks(sketches.train),
        n_examples=subsets.n,
        domains=codes,
        domain_names=domain_names,
        normalized_dims=sorted(set(settings.k_grid) | {sketches.k}),
        with_overlaps=subsets.n <= settings.datamodels_max_n,
    )
    trak = None
    if sketches.trak_train is not None:  # TRAK's Q_i ψ_i: one more streamed pass
        trak_features, trak_moments = compute_subset_features(
            membership,
            row_blocks(sketches.trak_train),
            n_examples=subsets.n,
            row_weights=sketches.trak_q,
        )
        features.sets["trak"] = trak_features.sums
        trak = FeatureSet("trak", sketches.trak_tasks, trak_moments)
    if sketches.trak_ref is not None:  # traker's per-example scores, summed per subset
        ref_features, _ = compute_subset_features(
            membership, row_blocks(sketches.trak_ref), n_examples=subsets.n
        )
        features.sets["trak-ref"] = ref_features.sums
    return FitInputs(
        features=features,
        moments=moments,
        residuals=sketches.residuals,
        trak=trak,
        task_names=sketches.task_names,
        roles=roles,
        designs=designs,
        loop_rounds=loop_rounds,
        utilities=measured,
        repeat_utilities=repeat,
    )


@dataclass
class FitOutputs:
    """Everything ``write_fit_outputs`` writes (tables as row lists, arrays, params)."""

    result: ProtocolResult
    params: dict[str, Any]
    prediction_rows: list[dict]
    by_design: list[dict]
    comparison: list[dict]
    bootstrap: dict[str, np.ndarray] | None
    baselines: dict[str, np.ndarray]  # what `select` needs of the fitted baselines
    n_fit: int
    n_eval: int
    fold_seed: int


def usable_subsets(
    roles: np.ndarray, measured: np.ndarray, max_excluded_fraction: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fit rows, eval rows, excluded rows): subsets with non-finite utilities are excluded,
    up to ``max_excluded_fraction`` of the fit/eval subsets (ValueError beyond)."""
    usable = np.isin(roles, ["fit", "eval"])
    bad = np.flatnonzero(usable & ~np.isfinite(measured).all(axis=1))
    if len(bad) > max_excluded_fraction * usable.sum():
        raise ValueError(
            f"{len(bad)} subsets have missing, NaN or infinite utilities "
            f"(e.g. subsets {bad[:8].tolist()}), more than surrogate.max_excluded_fraction allows"
        )
    usable[bad] = False
    fit_rows = np.flatnonzero(usable & (roles == "fit"))
    eval_rows = np.flatnonzero(usable & (roles == "eval"))
    if len(fit_rows) < 4 or len(eval_rows) < 3:
        raise ValueError(
            f"need at least 4 fit and 3 eval subsets with results, have {len(fit_rows)} and "
            f"{len(eval_rows)}; sample more subsets ([subsets] designs)"
        )
    return fit_rows, eval_rows, bad


def fit_surrogate(
    inputs: FitInputs,
    settings: Any,
    fold_seed: int,
    refit_seed: int,
    on_step: Any = None,
) -> FitOutputs:
    """The whole computation of fit-surrogate, on arrays (no files).

    ``settings``: the ``[surrogate]`` values; ``fold_seed`` drives cross-validation and the
    bootstrap; ``refit_seed`` the bootstrap refits of the chosen model.
    """
    fit_rows, eval_rows, bad = usable_subsets(
        inputs.roles, inputs.utilities, settings.max_excluded_fraction
    )
    features, measured, task_names = inputs.features, inputs.utilities, inputs.task_names
    # Sign convention. φ_i = P∇ℓ(z_i) is a gradient; training on S steps along −m_S, and the first-order
    # gain on task t is ⟨P∇L_t, m_S⟩ = ⟨r_t, −m_S⟩ with r_t = −P∇L_t. The surrogate's alignment term
    # ⟨v_t, m_S⟩ is therefore built on the task *gradient* −r_t, so that a_t ≥ 0 means "aligned helps".
    sets = [FeatureSet("sketch", -inputs.residuals, inputs.moments)]
    if inputs.trak is not None:
        sets.append(inputs.trak)
    # the closed loop's subsets (near a selection, chosen after an earlier fit) are fit data
    # in every fold, never validation data: the LCB estimates fidelity on the design
    adaptive = np.char.startswith(inputs.designs[fit_rows].astype(str), "loop-")
    result = run_protocol(
        features.take(fit_rows),
        measured[fit_rows],
        features.take(eval_rows),
        measured[eval_rows],
        cv_eligible=~adaptive if adaptive.any() else None,
        sets=sets,
        settings=settings,
        seed=fold_seed,
        task_names=task_names,
        on_step=on_step,
    )
    model = result.surrogate
    utility_std = np.nanstd(measured[fit_rows], axis=0)
    noise = noise_ceiling(measured, inputs.repeat_utilities, task_names)

    prediction_rows = []
    scored = np.concatenate([fit_rows, eval_rows])
    for method, fit in result.fits.items():
        predicted = np.asarray(fit.model.predict(features.take(scored)))
        for position, subset_id in enumerate(scored):
            for t, task in enumerate(task_names):
                prediction_rows.append(
                    {
                        "subset_id": int(subset_id),
                        "role": str(inputs.roles[subset_id]),
                        "task": task,
                        "method": method,
                        "predicted_utility": float(predicted[position, t]),
                        "measured_utility": float(measured[subset_id, t]),
                    }
                )
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
    bootstrap = (
        bootstrap_refits(
            model,
            features.take(fit_rows),
            measured[fit_rows],
            settings.bootstrap_refits,
            refit_seed,
        )
        if settings.bootstrap_refits > 0
        else None
    )
    baselines, baseline_params = baseline_arrays(result, features)
    params["baselines"] = baseline_params
    if features.domain_counts is not None:  # where the surrogate has seen data (trust region)
        shares = features.domain_counts[fit_rows] / features.sizes[fit_rows, None]
        params["fit_mixture"] = {
            "domains": features.domain_names,
            "max_share": shares.max(axis=0).tolist(),
        }
    eval_designs = inputs.designs[eval_rows]
    suites = {"all": np.arange(len(eval_rows))}
    suites.update({str(d): np.flatnonzero(eval_designs == d) for d in sorted(set(eval_designs))})
    comparison = compare_methods(
        {name: fit.model for name, fit in result.fits.items()},
        features.take(eval_rows),
        measured[eval_rows],
        suites,
        n_boot=settings.bootstrap,
        seed=fold_seed,
    )
    return FitOutputs(
        result=result,
        params=params,
        prediction_rows=prediction_rows,
        by_design=evaluation_by_design(prediction_rows, inputs.designs, task_names),
        comparison=comparison,
        bootstrap=bootstrap,
        baselines=baselines,
        n_fit=int(len(fit_rows)),
        n_eval=int(len(eval_rows)),
        fold_seed=fold_seed,
    )


def baseline_arrays(
    result: ProtocolResult, features: SubsetFeatures
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The fitted baselines the curation check selects with: the domain-mixture regression
    (RegMix) and TRAK (top-B). Arrays for ``baselines.npz`` and their description."""
    arrays: dict[str, np.ndarray] = {}
    described: dict[str, Any] = {}
    regmix = result.fits.get("regmix")
    if regmix is not None:
        arrays["regmix_coef"] = np.asarray(regmix.model.coef_)  # [D, T]
        described["regmix"] = {"domains": features.domain_names, "ridge": regmix.model.ridge}
    trak = result.fits.get("trak")
    if trak is not None:
        arrays["trak_directions"] = np.asarray(trak.model.directions)  # [T, k']
        arrays["trak_slope"] = np.asarray(trak.model.slope_)  # [T] utility per unit score
        described["trak"] = {
            "method": trak.name,
            "features": trak.model.feature_set,
            "k": trak.model.k_prime,
            "aggregation": trak.model.aggregation,
            "n_ref": trak.model.n_ref_,
        }
    return arrays, described


# lcb.parquet's columns with fixed types (a column that is null for some methods keeps its type).
LCB_SCHEMA = pa.schema(
    [
        ("method", pa.string()),
        ("n_fit", pa.int64()),
        ("features", pa.string()),
        ("k", pa.int64()),
        ("alignment", pa.string()),
        ("kernel_ridge", pa.float64()),
        ("quadratic", pa.bool_()),
        ("geometry", pa.string()),
        ("ridge", pa.float64()),
        ("aggregation", pa.string()),
        ("variant", pa.int64()),
        ("mean", pa.float64()),
        ("lcb", pa.float64()),
        ("n", pa.int64()),
        ("failures", pa.int64()),
        ("twin_gain", pa.float64()),
        ("eligible", pa.bool_()),
        ("chosen", pa.bool_()),
    ]
)


def lcb_table(rows: list[dict[str, Any]]) -> pa.Table:
    """The LCB rows as a table of ``LCB_SCHEMA`` (integers stay integers)."""

    def typed(row: dict[str, Any]) -> dict[str, Any]:
        out = {name: row.get(name) for name in LCB_SCHEMA.names}
        for name in ("k", "n_fit", "n", "failures", "variant"):
            if out[name] is not None:
                out[name] = int(out[name])
        return out

    return pa.Table.from_pylist([typed(r) for r in rows], schema=LCB_SCHEMA)


def write_fit_outputs(folder: Path, outputs: FitOutputs) -> None:
    """The files of ``surrogate/`` (into a folder being built; the manifest comes after)."""
    (folder / "params.json").write_text(
        json.dumps(outputs.params, indent=2, default=str), encoding="utf-8"
    )
    save_arrays(folder / "model.npz", outputs.result.surrogate.to_arrays())
    write_table(folder / "lcb.parquet", lcb_table(outputs.result.lcb_rows))
    write_table(folder / "evaluation.parquet", pa.Table.from_pylist(outputs.result.evaluation_rows))
    write_table(folder / "predictions.parquet", pa.Table.from_pylist(outputs.prediction_rows))
    if outputs.by_design:
        write_table(
            folder / "evaluation_by_design.parquet", pa.Table.from_pylist(outputs.by_design)
        )
    if outputs.comparison:
        write_table(folder / "comparison.parquet", pa.Table.from_pylist(outputs.comparison))
    if outputs.bootstrap is not None:
        save_arrays(folder / "bootstrap.npz", outputs.bootstrap)
    if outputs.baselines:
        save_arrays(folder / "baselines.npz", outputs.baselines)


def run_fit_surrogate(ctx: StageContext) -> str:
    layout, config = ctx.layout, ctx.config
    inputs = load_fit_inputs(ctx)
    fold_seed = config.seed("surrogate")
    try:
        outputs = fit_surrogate(
            inputs,
            config.surrogate,
            fold_seed,
            config.seed("bootstrap-refits"),
            on_step=progress_steps("fit-surrogate", ctx.progress),
        )
    except ValueError as exc:  # the data cannot support a fit: a problem with the inputs
        raise InputError(f"{layout.retrain}: {exc}") from None
    for method, reason in outputs.result.skipped.items():
        print(f"note: baseline {method} skipped: {reason}")
    with artifact_dir(layout.surrogate) as folder:
        write_fit_outputs(folder, outputs)
        write_manifest(
            folder,
            build_manifest(
                layout,
                "surrogate",
                config,
                content=folder_digest(folder),
                seeds={"folds": fold_seed},
                extra={
                    "n_fit": outputs.n_fit,
                    "n_eval": outputs.n_eval,
                    "loop_rounds": inputs.loop_rounds,
                },
            ),
        )
    return summary_text(
        outputs.result.evaluation_rows,
        outputs.result.surrogate,
        outputs.params["noise"],
        outputs.n_fit,
        outputs.n_eval,
        layout.surrogate,
    )


def noise_ceiling(
    base: np.ndarray, repeat: np.ndarray | None, task_names: list[str]
) -> dict[str, Any]:
    """Seed-to-seed Spearman of subsets measured with two seeds (``base``, ``repeat``: ``[M, T]``,
    NaN where not measured), per task and mean, and the √ρ ceiling; {} with fewer than 3."""
    if repeat is None:
        return {}
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
                predicted = np.array([r["predicted_utility"] for r in picked])
                measured = np.array([r["measured_utility"] for r in picked])
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
    model: GraspSurrogate, features: SubsetFeatures, utilities: np.ndarray, count: int, seed: int
) -> dict[str, np.ndarray]:
    """The chosen candidate refit on ``count`` bootstrap resamples of the fit subsets."""
    rng = np.random.default_rng(seed)
    linear, curvature, intercepts = [], [], []
    for _ in range(count):
        rows = rng.choice(len(features), size=len(features), replace=True)
        refit = model.unfitted_copy().fit(features.take(rows), utilities[rows])
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
