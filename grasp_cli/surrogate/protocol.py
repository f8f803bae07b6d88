"""Fit GRASP and the baselines by the LCB protocol, then evaluate on held-out subsets.

The no-leak rule is structural: every function that fits, cross-validates or
chooses hyperparameters (``fit_method``, ``fit_methods``) takes the fit-role
arrays only. Evaluation subsets enter in exactly one place,
``evaluate_methods``, after every model is frozen. ``run_protocol`` chains the
two and adds the artifact-cost curve (GRASP rerun, protocol included, on the
first ``n`` fit subsets).

Rows returned are plain dicts ready for Parquet:

- LCB table: ``method, n_fit, k, geometry, ridge, aggregation, mean, lcb, n, failures,
  chosen`` (fields a method does not have are None; ``ridge`` may be ``inf``).
- evaluation: ``method, task, n_fit, spearman, ci_low, ci_high, pearson, n_eval``
  with ``task == "mean"`` for the average over tasks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from grasp_cli.surrogate.baselines import (
    ConstantBaseline,
    Datamodels,
    DomainMixture,
    GradientCosine,
    ReferenceScores,
    TrakBaseline,
)
from grasp_cli.surrogate.features import CorpusMoments, SubsetFeatures
from grasp_cli.surrogate.geometry import GEOMETRY_ORDER
from grasp_cli.surrogate.lcb import (
    MIN_FIT_SUBSETS,
    CandidateScore,
    Estimator,
    choose_nested,
    repeated_kfold,
    score_candidates,
)
from grasp_cli.surrogate.metrics import (
    bootstrap_correlations,
    bootstrap_paired_difference,
    pearson,
    spearman,
)
from grasp_cli.surrogate.model import GraspSurrogate, check_utilities

__all__ = [
    "FeatureSet",
    "MethodFit",
    "MethodSpec",
    "ProtocolResult",
    "ProtocolSettings",
    "baseline_specs",
    "compare_methods",
    "cost_curve",
    "evaluate_methods",
    "fit_method",
    "fit_methods",
    "grasp_spec",
    "run_protocol",
    "split_by_role",
]


@dataclass(frozen=True)
class ProtocolSettings:
    """The finite candidate grids and cross-validation settings (plain values, no CLI types).

    Field names match the ``[surrogate]`` config section, so ``ProtocolSettings.of(section)``
    takes it (or any object with these attributes).
    """

    k_grid: tuple[int, ...] = (32, 128)
    feature_grid: tuple[str, ...] = ("sketch", "trak")
    alignment_grid: tuple[str, ...] = ("plain", "natural")
    kernel_ridge_grid: tuple[float, ...] = (1e-2, 1e-1, 1.0)
    quadratic_grid: tuple[bool, ...] = (True, False)
    geometry_grid: tuple[str, ...] = ("identity", "diagonal")
    ridge_grid: tuple[float, ...] = (1.0, float("inf"))
    aggregation_grid: tuple[str, ...] = ("mean",)
    trak_ridge_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    folds: int = 5
    repeats: int = 2
    delta: float = 0.1
    baseline_ridge_grid: tuple[float, ...] = (1e-3, 1e-1, 10.0)
    datamodels_max_n: int = 200_000
    cost_curve: tuple[int, ...] = (8, 16, 32)
    bootstrap: int = 1000

    @classmethod
    def of(cls, source: Any) -> ProtocolSettings:
        if isinstance(source, cls):
            return source
        values = {}
        for name, spec in cls.__dataclass_fields__.items():
            value = getattr(source, name, spec.default)
            values[name] = tuple(value) if isinstance(value, (list, tuple)) else value
        return cls(**values)


_AGGREGATION_ORDER = {"mean": 0, "sum": 1}


@dataclass
class MethodSpec:
    """A method and its own finite hyperparameter grid.

    build: candidate dict → unfitted estimator. complexity: candidate → sort key, smaller
    is simpler (breaks LCB ties).
    """

    name: str
    grid: list[dict[str, Any]]
    build: Callable[[dict[str, Any]], Estimator]
    complexity: Callable[[dict[str, Any]], tuple]


@dataclass
class MethodFit:
    """The outcome of the LCB protocol for one method on one set of fit subsets."""

    name: str
    scores: list[CandidateScore]
    chosen_index: int
    model: Estimator
    n_fit: int

    @property
    def chosen(self) -> dict[str, Any]:
        return dict(self.scores[self.chosen_index].candidate)

    def lcb_rows(self) -> list[dict[str, Any]]:
        rows = []
        for i, score in enumerate(self.scores):
            cand = score.candidate
            rows.append(
                {
                    "method": self.name,
                    "n_fit": self.n_fit,
                    "features": cand.get("features"),
                    "k": cand.get("k"),
                    "alignment": cand.get("alignment"),
                    "kernel_ridge": cand.get("kernel_ridge"),
                    "quadratic": cand.get("quadratic"),
                    "geometry": cand.get("geometry"),
                    "ridge": cand.get("ridge"),
                    "aggregation": cand.get("aggregation"),
                    "variant": cand.get("variant"),
                    "mean": score.mean,
                    "lcb": score.lcb,
                    "n": score.n,
                    "failures": score.failures,
                    "twin_gain": score.twin_gain,
                    "eligible": score.eligible,
                    "chosen": i == self.chosen_index,
                }
            )
        return rows


@dataclass
class ProtocolResult:
    """Everything ``fit-surrogate`` writes: the refit GRASP model, tables, choices."""

    surrogate: GraspSurrogate
    fits: dict[str, MethodFit]
    lcb_rows: list[dict[str, Any]]
    evaluation_rows: list[dict[str, Any]]
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def chosen(self) -> dict[str, dict[str, Any]]:
        return {name: fit.chosen for name, fit in self.fits.items()}


def _seed(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, stream]).generate_state(1)[0])


def _valid_dims(k_grid: Sequence[int], k_max: int) -> list[int]:
    """The prefixes of ``k_grid`` and the whole ``k_max``, sorted; ValueError when one exceeds
    ``k_max`` (the stage checks the grid against the stored sketch first, in one line)."""
    dims = sorted({int(k) for k in k_grid} | {int(k_max)})
    if dims[0] <= 0 or dims[-1] > k_max:
        raise ValueError(f"k_grid {list(k_grid)} must list dims in 1..{k_max}")
    return dims


# ------------------------------------------------------------------- method specs


@dataclass
class FeatureSet:
    """One kind of per-example features the surrogate can aggregate over a subset.

    name: "sketch" (the loss-gradient sketches φ_i) or "trak" (TRAK's ``Q_i ψ_i``);
    targets: the task directions ``[T, k_set]`` the alignment term uses (``−r_t``, the task
    loss gradient, for "sketch"; ``ψ_t``, the task's output gradient, for "trak" — in both
    cases a positive inner product with ``m_S`` means training on S helps the task);
    moments: the set's corpus moments (``kernel`` is the unweighted Gram for "trak").
    """

    name: str
    targets: np.ndarray
    moments: CorpusMoments

    @property
    def dim(self) -> int:
        return int(self.targets.shape[1])


def set_dims(k_grid: Sequence[int], dim: int) -> list[int]:
    """A feature set's prefixes: the grid's dims that fit, and always the whole set."""
    return sorted({int(k) for k in k_grid if 0 < int(k) <= dim} | {int(dim)})


def grasp_spec(
    sets: Sequence[FeatureSet],
    settings: Any,
    *,
    task_names: Sequence[str] | None = None,
    quadratic_grid: Sequence[bool] | None = None,
    name: str = "grasp",
) -> MethodSpec:
    """GRASP's finite grid: feature set × k' × alignment (plain | natural | kernel λ) ×
    (quadratic term with geometry G, or none) × correction ridge λ × aggregation.

    The grid holds the additive models (no quadratic term) and, on the "trak" set with the
    kernel alignment and no correction, TRAK itself: GRASP nests the best additive
    predictor, and the LCB protocol falls back to it when the interaction terms do not earn
    their place on the fit subsets. ``quadratic_grid=(False,)`` gives the additive baseline.
    """
    settings = ProtocolSettings.of(settings)
    quadratics = list(
        dict.fromkeys(settings.quadratic_grid if quadratic_grid is None else quadratic_grid)
    )
    cache: dict = {}
    by_name = {fs.name: fs for fs in sets}
    grid: list[dict[str, Any]] = []
    for fs in sets:
        alignments: list[tuple[str, float | None]] = []
        for al in dict.fromkeys(settings.alignment_grid):
            if al == "kernel":
                alignments += [
                    ("kernel", float(lam)) for lam in dict.fromkeys(settings.kernel_ridge_grid)
                ]
            else:
                alignments.append((al, None))
        for k, (al, lam_k), quad, lam, agg in itertools.product(
            set_dims(settings.k_grid, fs.dim),
            alignments,
            quadratics,
            list(dict.fromkeys(settings.ridge_grid)),
            list(dict.fromkeys(settings.aggregation_grid)),
        ):
            geometries = list(dict.fromkeys(settings.geometry_grid)) if quad else [None]
            for g in geometries:
                grid.append(
                    {
                        "features": fs.name,
                        "k": k,
                        "alignment": al,
                        "kernel_ridge": lam_k,
                        "quadratic": bool(quad),
                        "geometry": g,
                        "ridge": float(lam),
                        "aggregation": agg,
                    }
                )

    def build(c: dict[str, Any]) -> GraspSurrogate:
        fs = by_name[c["features"]]
        return GraspSurrogate(
            fs.targets,
            k_prime=c["k"],
            geometry=c["geometry"] or "identity",
            ridge=c["ridge"],
            aggregation=c["aggregation"],
            quadratic=c["quadratic"],
            moments=fs.moments,
            task_names=task_names,
            alignment=c["alignment"],
            feature_set=fs.name,
            kernel_ridge=c["kernel_ridge"],
            direction_cache=cache,
        )

    def complexity(c: dict[str, Any]) -> tuple:
        return (
            c["quadratic"],
            c["k"],
            c["alignment"] != "plain",
            GEOMETRY_ORDER.get(c["geometry"] or "identity", 99),
            -c["ridge"],
            _AGGREGATION_ORDER[c["aggregation"]],
            c["features"] != "sketch",
        )

    return MethodSpec(name, grid, build, complexity)


def baseline_specs(
    sets: Sequence[FeatureSet],
    features_fit: SubsetFeatures,
    settings: Any,
    task_names: Sequence[str] | None = None,
) -> tuple[list[MethodSpec], dict[str, str]]:
    """The baselines that the available features allow → (specs, {skipped method: reason}).

    ``trak`` is TRAK as published (θ0 only) when the "trak" feature set exists; without it, it
    scores the loss-gradient sketches the same way (its params say which: ``features``). ``trak-ref`` is the
    ``traker`` package's own scores (``features.sets["trak-ref"]``), when they were computed.
    """
    settings = ProtocolSettings.of(settings)
    by_name = {fs.name: fs for fs in sets}
    sketch = by_name["sketch"]
    residuals = sketch.targets
    k_max = min(residuals.shape[1], features_fit.k)
    dims = _valid_dims(settings.k_grid, k_max)
    aggregations = list(dict.fromkeys(settings.aggregation_grid))
    ridges = [float(r) for r in dict.fromkeys(settings.baseline_ridge_grid)]
    finite_ridges = [r for r in ridges if math.isfinite(r)]
    specs: list[MethodSpec] = []
    skipped: dict[str, str] = {}
    n_tasks = residuals.shape[0]

    specs.append(
        grasp_spec(sets, settings, task_names=task_names, quadratic_grid=(False,), name="additive")
    )

    def by_k_ridge_agg(c: dict[str, Any]) -> tuple:
        return (
            c.get("k") or 0,
            -(c.get("ridge") or 0.0),
            _AGGREGATION_ORDER.get(c.get("aggregation"), 0),
        )

    trak_set = by_name.get("trak", sketch)
    trak_grid = [
        {"k": k, "ridge": float(r), "aggregation": a}
        for k, r, a in itertools.product(
            set_dims(settings.k_grid, trak_set.dim),
            dict.fromkeys(settings.trak_ridge_grid),
            dict.fromkeys(["sum", "mean"]),
        )
    ]
    trak_cache: dict = {}
    specs.append(
        MethodSpec(
            "trak",
            trak_grid,
            lambda c: TrakBaseline(
                trak_set.targets,
                trak_set.moments,
                k_prime=c["k"],
                ridge=c["ridge"],
                aggregation=c["aggregation"],
                feature_set=trak_set.name,
                direction_cache=trak_cache,
            ),
            by_k_ridge_agg,
        )
    )
    if "trak-ref" in features_fit.sets:
        variants = features_fit.sets["trak-ref"].shape[1] // max(n_tasks, 1)
        specs.append(
            MethodSpec(
                "trak-ref",
                [
                    {"variant": v, "aggregation": a}
                    for v, a in itertools.product(range(variants), ["sum", "mean"])
                ],
                lambda c: ReferenceScores(
                    "trak-ref", c["variant"], n_tasks, aggregation=c["aggregation"]
                ),
                lambda c: (c["variant"], _AGGREGATION_ORDER[c["aggregation"]]),
            )
        )
    else:
        skipped["trak-ref"] = "the traker package did not run (sketch.trak_ref; grasp-cli[anchors])"

    cos_dims = [k for k in dims if k in features_fit.normalized_sums]
    if not cos_dims:
        cos_dims = [k for k in sorted(features_fit.normalized_sums) if k <= k_max][-1:]
    if cos_dims:
        specs.append(
            MethodSpec(
                "cosine",
                [{"k": k, "aggregation": a} for k, a in itertools.product(cos_dims, aggregations)],
                lambda c: GradientCosine(residuals, k_prime=c["k"], aggregation=c["aggregation"]),
                by_k_ridge_agg,
            )
        )
    else:
        skipped["cosine"] = "no normalized sketch sums were computed"

    if features_fit.overlaps is None:
        skipped["datamodels"] = "subset overlaps were not computed"
    elif features_fit.n_examples > settings.datamodels_max_n:
        skipped["datamodels"] = (
            f"N = {features_fit.n_examples} exceeds surrogate.datamodels_max_n = {settings.datamodels_max_n}"
        )
    elif not finite_ridges:
        skipped["datamodels"] = "surrogate.baseline_ridge_grid has no finite λ"
    else:
        specs.append(
            MethodSpec(
                "datamodels",
                [{"ridge": r} for r in finite_ridges],
                lambda c: Datamodels(ridge=c["ridge"]),
                by_k_ridge_agg,
            )
        )

    if features_fit.domain_counts is None or features_fit.domain_counts.shape[1] < 2:
        skipped["regmix"] = "needs domain labels with at least 2 domains"
    elif not finite_ridges:
        skipped["regmix"] = "surrogate.baseline_ridge_grid has no finite λ"
    else:
        specs.append(
            MethodSpec(
                "regmix",
                [{"ridge": r} for r in finite_ridges],
                lambda c: DomainMixture(ridge=c["ridge"]),
                by_k_ridge_agg,
            )
        )

    specs.append(MethodSpec("constant", [{}], lambda c: ConstantBaseline(), lambda c: ()))
    return specs, skipped


# -------------------------------------------------------------- fitting (fit only)


def fit_method(
    spec: MethodSpec,
    features_fit: SubsetFeatures,
    utilities_fit: np.ndarray,
    *,
    folds: int,
    repeats: int,
    delta: float,
    seed: int,
    eligible: np.ndarray | None = None,
) -> MethodFit:
    """LCB protocol for one method on fit subsets only; refit the winner on all of them.
    ``eligible``: the fit subsets that may be validation subsets (``lcb.repeated_kfold``).

    The winner is the highest LCB among candidates that pass the nested-twin test
    (``lcb.choose_nested``): a quadratic GRASP candidate must beat its own ``b = 0`` twin.
    """
    values = check_utilities(utilities_fit, len(features_fit), "fit utilities")
    splits = repeated_kfold(len(features_fit), folds, repeats, seed, eligible)
    scores = score_candidates(spec.build, spec.grid, features_fit, values, splits, delta)
    chosen = choose_nested(scores, spec.complexity, delta)
    model = spec.build(scores[chosen].candidate)
    model.fit(features_fit, values)
    return MethodFit(spec.name, scores, chosen, model, len(features_fit))


def fit_methods(
    specs: Sequence[MethodSpec],
    features_fit: SubsetFeatures,
    utilities_fit: np.ndarray,
    *,
    folds: int,
    repeats: int,
    delta: float,
    seed: int,
    skipped: dict[str, str] | None = None,
    eligible: np.ndarray | None = None,
) -> dict[str, MethodFit]:
    """``fit_method`` for each spec with the same folds (paired comparisons).

    A baseline that cannot be fitted on any fold is recorded in ``skipped``; GRASP
    (the first spec named 'grasp') failing is an error.
    """
    fits: dict[str, MethodFit] = {}
    for spec in specs:
        try:
            fits[spec.name] = fit_method(
                spec,
                features_fit,
                utilities_fit,
                folds=folds,
                repeats=repeats,
                delta=delta,
                seed=seed,
                eligible=eligible,
            )
        except (ValueError, np.linalg.LinAlgError) as exc:
            if spec.name == "grasp" or skipped is None:
                raise
            skipped[spec.name] = f"could not be fitted: {exc}"
    return fits


# ------------------------------------------------------------ evaluation (eval only)


def evaluate_methods(
    models: dict[str, Estimator],
    features_eval: SubsetFeatures,
    utilities_eval: np.ndarray,
    *,
    task_names: Sequence[str],
    n_fit: int,
    n_boot: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Per method and task: Spearman (with a paired bootstrap 95% CI), Pearson, on eval subsets.

    The ``task == "mean"`` row averages the per-task values; its CI is the bootstrap
    distribution of that average (subsets resampled jointly across tasks). Every method
    sees the same resamples.
    """
    measured = check_utilities(utilities_eval, len(features_eval), "evaluation utilities")
    if measured.shape[1] != len(task_names):
        raise ValueError(
            f"evaluation utilities have {measured.shape[1]} tasks, names {len(task_names)}"
        )
    rows: list[dict[str, Any]] = []
    for name, model in models.items():
        predicted = np.asarray(model.predict(features_eval), dtype=np.float64)
        if not np.isfinite(predicted).all():
            raise ValueError(
                f"method {name!r} predicted non-finite utilities on evaluation subsets"
            )
        rho = np.atleast_1d(spearman(predicted, measured))
        lin = np.atleast_1d(pearson(predicted, measured))
        ci = bootstrap_correlations(predicted, measured, n_boot=n_boot, seed=seed)
        for t, task in enumerate(task_names):
            rows.append(
                {
                    "method": name,
                    "task": task,
                    "n_fit": n_fit,
                    "spearman": float(rho[t]),
                    "ci_low": float(ci["low"][t]),
                    "ci_high": float(ci["high"][t]),
                    "pearson": float(lin[t]),
                    "n_eval": len(features_eval),
                }
            )
        rows.append(
            {
                "method": name,
                "task": "mean",
                "n_fit": n_fit,
                "spearman": float(rho.mean()),
                "ci_low": float(ci["mean_low"]),
                "ci_high": float(ci["mean_high"]),
                "pearson": float(lin.mean()),
                "n_eval": len(features_eval),
            }
        )
    return rows


def cost_curve(
    spec: MethodSpec,
    features_fit: SubsetFeatures,
    utilities_fit: np.ndarray,
    features_eval: SubsetFeatures,
    utilities_eval: np.ndarray,
    counts: Sequence[int],
    *,
    task_names: Sequence[str],
    folds: int,
    repeats: int,
    delta: float,
    seed: int,
    n_boot: int,
    boot_seed: int | None = None,
    include_all: bool = True,
    eligible: np.ndarray | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rerun the whole protocol on the first ``n`` fit subsets for each ``n`` in ``counts``
    (``eligible``: which fit subsets may be validation subsets; see ``fit_method``).

    Counts at or above the number of fit subsets, or below the cross-validation minimum,
    are skipped; all fit subsets are included when ``include_all``. ``seed`` drives the
    folds, ``boot_seed`` (default ``seed``) the bootstrap. Returns
    (evaluation rows with ``n_fit = n``, LCB rows with ``n_fit = n``).
    """
    n_total = len(features_fit)
    ns = sorted({int(n) for n in counts if MIN_FIT_SUBSETS <= int(n) < n_total})
    if include_all:
        ns.append(n_total)
    eval_rows: list[dict[str, Any]] = []
    lcb_rows: list[dict[str, Any]] = []
    for n in ns:
        rows = np.arange(n)
        fit = fit_method(
            spec,
            features_fit.take(rows),
            np.asarray(utilities_fit)[:n],
            folds=folds,
            repeats=repeats,
            delta=delta,
            seed=seed,
            eligible=None if eligible is None else np.asarray(eligible)[:n],
        )
        lcb_rows.extend(fit.lcb_rows())
        eval_rows.extend(
            evaluate_methods(
                {spec.name: fit.model},
                features_eval,
                utilities_eval,
                task_names=task_names,
                n_fit=n,
                n_boot=n_boot,
                seed=seed if boot_seed is None else boot_seed,
            )
        )
    return eval_rows, lcb_rows


def compare_methods(
    models: dict[str, Estimator],
    features_eval: SubsetFeatures,
    utilities_eval: np.ndarray,
    suites: dict[str, np.ndarray],
    *,
    reference: str = "grasp",
    n_boot: int,
    seed: int,
    min_subsets: int = 5,
) -> list[dict[str, Any]]:
    """``reference`` − every other method on each suite of eval subsets, paired.

    suites: name -> positions into the eval arrays (e.g. "all", one per design; a suite with
    fewer than ``min_subsets`` is skipped). Each row: suite, method (the reference), baseline,
    difference of mean-over-tasks Spearman with its paired bootstrap 95 % interval (the same
    resampled subsets for both), n_eval, and ``best``: whether the baseline has the highest
    point estimate of all the others on that suite (the constant predictor is left out).
    """
    rows: list[dict[str, Any]] = []
    measured_all = check_utilities(utilities_eval, len(features_eval), "evaluation utilities")
    others = [m for m in models if m not in (reference, "constant")]
    for suite, positions in suites.items():
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) < min_subsets or reference not in models or not others:
            continue
        part = features_eval.take(positions)
        measured = measured_all[positions]
        predicted = {m: np.asarray(models[m].predict(part), dtype=np.float64) for m in models}
        means = {m: float(np.mean(spearman(predicted[m], measured))) for m in predicted}
        best = max(others, key=lambda m: np.nan_to_num(means[m], nan=-2.0))
        for other in others:
            diff, low, high = bootstrap_paired_difference(
                predicted[reference], predicted[other], measured, n_boot=n_boot, seed=seed
            )
            rows.append(
                {
                    "suite": suite,
                    "method": reference,
                    "baseline": other,
                    "method_spearman": means[reference],
                    "baseline_spearman": means[other],
                    "difference": diff,
                    "ci_low": low,
                    "ci_high": high,
                    "n_eval": int(len(positions)),
                    "best": other == best,
                }
            )
    return rows


def split_by_role(
    features: SubsetFeatures, utilities: np.ndarray, roles: Sequence[str]
) -> tuple[SubsetFeatures, np.ndarray, SubsetFeatures, np.ndarray]:
    """Split all subsets into (fit features, fit utilities, eval features, eval utilities).

    roles: ``[M]`` of 'fit' / 'eval'. Utilities are not validated here: the fit half is
    checked when fitting, the eval half when evaluating.
    """
    roles = np.asarray(roles).astype(str)
    unknown = sorted(set(roles.tolist()) - {"fit", "eval"})
    if unknown:
        raise ValueError(f"unknown subset roles {unknown}: expected 'fit' or 'eval'")
    values = np.asarray(utilities, dtype=np.float64)
    fit_rows = np.flatnonzero(roles == "fit")
    eval_rows = np.flatnonzero(roles == "eval")
    return features.take(fit_rows), values[fit_rows], features.take(eval_rows), values[eval_rows]


def run_protocol(
    features_fit: SubsetFeatures,
    utilities_fit: np.ndarray,
    features_eval: SubsetFeatures,
    utilities_eval: np.ndarray,
    *,
    settings: Any,
    seed: int,
    task_names: Sequence[str],
    sets: Sequence[FeatureSet] | None = None,
    residuals: np.ndarray | None = None,
    moments: CorpusMoments | None = None,
    baselines: bool = True,
    on_step: Callable[[int, int, str], None] | None = None,
    cv_eligible: np.ndarray | None = None,
) -> ProtocolResult:
    """The whole ``fit-surrogate`` computation.

    1. GRASP and every baseline choose their hyperparameters by the LCB protocol and are
       refit — on ``features_fit``/``utilities_fit`` only.
    2. The frozen models are evaluated on ``features_eval``/``utilities_eval``.
    3. Artifact-cost curves: every fitted method, protocol included, on the first ``n`` fit
       subsets for ``n`` in ``settings.cost_curve`` (the all-subsets point is the step-2 row).
    ``sets``: the feature sets (default: one "sketch" set from ``residuals``, the alignment
    targets, and ``moments``); GRASP's grid uses those named in ``settings.feature_grid``.
    ``seed`` drives the folds; the bootstrap uses a seed derived from it. ``on_step(done,
    total, what)`` is told after each step (the fits, the evaluation, each cost curve), for
    progress. ``cv_eligible`` (bool per fit subset): the fit subsets cross-validation may
    hold out (default all); adaptively chosen fit subsets (the closed loop's) are trained on
    in every fold but never validate one, so the LCB keeps estimating fidelity on the
    subset design.
    """
    settings = ProtocolSettings.of(settings)
    if sets is None:
        if residuals is None or moments is None:
            raise ValueError("run_protocol needs feature sets, or residuals and moments")
        sets = [
            FeatureSet("sketch", np.atleast_2d(np.asarray(residuals, dtype=np.float64)), moments)
        ]
    values_fit = check_utilities(utilities_fit, len(features_fit), "fit utilities")
    task_names = list(task_names)
    if values_fit.shape[1] != len(task_names):
        raise ValueError(f"fit utilities have {values_fit.shape[1]} tasks, names {len(task_names)}")
    fold_seed, boot_seed = _seed(seed, 0), _seed(seed, 1)
    cv = {
        "folds": settings.folds,
        "repeats": settings.repeats,
        "delta": settings.delta,
        "seed": fold_seed,
        "eligible": cv_eligible,
    }
    grasp_sets = [fs for fs in sets if fs.name in settings.feature_grid or fs.name == "sketch"]
    if "sketch" not in settings.feature_grid and len(grasp_sets) > 1:
        grasp_sets = [fs for fs in grasp_sets if fs.name != "sketch"]
    main_spec = grasp_spec(grasp_sets, settings, task_names=task_names)
    specs = [main_spec]
    skipped: dict[str, str] = {}
    if baselines:
        extra, skipped = baseline_specs(sets, features_fit, settings, task_names)
        specs.extend(extra)
    steps = 2 + sum(spec.name != "constant" for spec in specs)
    done = [0]

    def step(what: str) -> None:
        done[0] += 1
        if on_step is not None:
            on_step(done[0], steps, what)

    fits = fit_methods(specs, features_fit, values_fit, skipped=skipped, **cv)
    step(f"{len(fits)} methods fitted by the LCB protocol")

    n_fit = len(features_fit)
    lcb_rows = [row for fit in fits.values() for row in fit.lcb_rows()]
    evaluation_rows = evaluate_methods(
        {name: fit.model for name, fit in fits.items()},
        features_eval,
        utilities_eval,
        task_names=task_names,
        n_fit=n_fit,
        n_boot=settings.bootstrap,
        seed=boot_seed,
    )
    step("held-out evaluation")
    curve_eval: list[dict[str, Any]] = []
    curve_lcb: list[dict[str, Any]] = []
    for spec in specs:  # every fitted method's artifact-cost curve (constant has none)
        if spec.name == "constant":
            continue
        if spec.name not in fits:
            step(f"{spec.name} skipped")
            continue
        rows_eval, rows_lcb = cost_curve(
            spec,
            features_fit,
            values_fit,
            features_eval,
            utilities_eval,
            settings.cost_curve,
            task_names=task_names,
            n_boot=settings.bootstrap,
            boot_seed=boot_seed,
            include_all=False,
            **cv,
        )
        curve_eval += rows_eval
        curve_lcb += rows_lcb
        step(f"cost curve of {spec.name}")
    return ProtocolResult(
        surrogate=fits["grasp"].model,  # type: ignore[arg-type]
        fits=fits,
        lcb_rows=lcb_rows + curve_lcb,
        evaluation_rows=evaluation_rows + curve_eval,
        skipped=skipped,
    )
