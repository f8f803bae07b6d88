"""Fidelity at scale: every method on a big subset design, and GRASP@n against datamodels@10n.

Builds (or resumes) a run with many more retrained subsets than the demo — by default 300
mixture + 140 within-domain subsets on the demo corpus and recipe, 35 % held out for evaluation
— through the real CLI (sketch and retraining as local shards, exactly as a SLURM array would
split them), fits every method with the LCB protocol, and measures:

- the held-out table of every method (mean Spearman over tasks, bootstrap 95 % intervals),
  overall and per design, with the paired difference GRASP − each baseline;
- every method's artifact-cost curve (refit on the first n fit subsets);
- the paper's claim "a tenth of the artifact cost": GRASP fitted on n subsets against
  datamodels fitted on 10·n, each with its own LCB choice, scored on the same eval subsets with
  a *paired* bootstrap interval of the difference.

Whatever it shows is what it prints. On 2 CPU cores the default takes roughly 30–60 minutes
(most of it retraining, which shards; rerun to resume after a kill).

    python scripts/bench_fidelity.py --json bench-fidelity.json [--run runs/bench-fidelity]
        [--config configs/demo.toml] [--mixture 300] [--within 140] [--shards 2] [--ns 8,16,24]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def grasp(*args: str, shards: int = 0) -> None:
    """Run a grasp stage through the CLI (as N local shards when ``shards`` > 1)."""
    command = [sys.executable, "-c", "from grasp_cli.cli import entry; entry()", *args]
    if shards > 1:
        command = ["bash", str(ROOT / "scripts" / "run_shards.sh"), str(shards), *command]
    print("+", " ".join(args[:1] + args[3:4]), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "GRASP_PROGRESS": "0"})


def build_run(args: argparse.Namespace, ns: list[int]) -> list[str]:
    sets = [
        "--set",
        f"subsets.designs={{ mixture = {args.mixture}, within = {args.within} }}",
        "--set",
        f"surrogate.cost_curve={sorted(set(ns) | {10 * n for n in ns})}",
    ]
    common = ["--config", str(args.config), "--run", str(args.run), *sets]
    grasp("prepare", *common)
    grasp("sketch", *common, shards=args.shards)
    grasp("retrain-subsets", *common, shards=args.shards)
    grasp("fit-surrogate", *common)
    return common


def tenth_of_the_cost(run: Path, common: list[str], ns: list[int], n_boot: int) -> list[dict]:
    """GRASP on the first n fit subsets vs datamodels on the first 10·n, each chosen by its own
    LCB protocol on those subsets only, on the same eval subsets (paired bootstrap)."""
    from grasp_cli.cli import make_context
    from grasp_cli.stages import stage_named
    from grasp_cli.surrogate.metrics import bootstrap_paired_difference, spearman
    from grasp_cli.surrogate.protocol import (
        FeatureSet,
        ProtocolSettings,
        baseline_specs,
        fit_method,
        grasp_spec,
    )
    from grasp_cli.surrogate.stage import load_fit_inputs, usable_subsets

    flags = {
        "config": Path(common[1]),
        "run": run,
        "set_": [common[i + 1] for i, c in enumerate(common) if c == "--set"],
        "quiet": True,
        "force": False,
        "shard": None,
        "num_shards": None,
    }
    ctx = make_context(stage_named("fit-surrogate"), flags)
    inputs = load_fit_inputs(ctx)
    settings = ProtocolSettings.of(ctx.config.surrogate)
    fit_rows, eval_rows, _ = usable_subsets(
        inputs.roles, inputs.utilities, ctx.config.surrogate.max_excluded_fraction
    )
    features_fit = inputs.features.take(fit_rows)
    features_eval = inputs.features.take(eval_rows)
    measured_fit, measured_eval = inputs.utilities[fit_rows], inputs.utilities[eval_rows]
    sets = [FeatureSet("sketch", -inputs.residuals, inputs.moments)]
    if inputs.trak is not None:
        sets.append(inputs.trak)
    grasp_sets = [fs for fs in sets if fs.name in settings.feature_grid or fs.name == "sketch"]
    specs = {"grasp": grasp_spec(grasp_sets, settings, task_names=inputs.task_names)}
    extra, _ = baseline_specs(sets, features_fit, settings, inputs.task_names)
    specs.update({s.name: s for s in extra if s.name == "datamodels"})
    cv = {
        "folds": settings.folds,
        "repeats": settings.repeats,
        "delta": settings.delta,
        "seed": ctx.config.seed("surrogate"),
    }
    rows = []
    for n in ns:
        if 10 * n > len(fit_rows):
            print(f"skip n={n}: 10n = {10 * n} > {len(fit_rows)} fit subsets", flush=True)
            continue
        predicted = {}
        for name, count in (("grasp", n), ("datamodels", 10 * n)):
            first = np.arange(count)
            fit = fit_method(specs[name], features_fit.take(first), measured_fit[:count], **cv)
            predicted[name] = np.asarray(fit.model.predict(features_eval))
        diff, low, high = bootstrap_paired_difference(
            predicted["grasp"], predicted["datamodels"], measured_eval, n_boot=n_boot, seed=n
        )
        rows.append(
            {
                "n": n,
                "grasp_at_n": float(np.mean(spearman(predicted["grasp"], measured_eval))),
                "datamodels_at_10n": float(
                    np.mean(spearman(predicted["datamodels"], measured_eval))
                ),
                "difference": diff,
                "ci_low": low,
                "ci_high": high,
                "n_eval": int(len(eval_rows)),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def summarize(run: Path) -> dict:
    """Every method's held-out numbers, by design, paired comparisons and cost curves."""
    import pyarrow.parquet as pq

    folder = run / "surrogate"
    evaluation = pq.read_table(folder / "evaluation.parquet").to_pylist()
    full = {}
    for r in evaluation:
        if r["task"] == "mean" and r["n_fit"] >= full.get(r["method"], {}).get("n_fit", -1):
            full[r["method"]] = r
    curves: dict[str, list] = {}
    for r in sorted(evaluation, key=lambda r: r["n_fit"]):
        if r["task"] == "mean":
            curves.setdefault(r["method"], []).append(
                {"n_fit": r["n_fit"], "spearman": r["spearman"]}
            )
    params = json.loads((folder / "params.json").read_text())
    return {
        "methods": {
            m: {k: r[k] for k in ("spearman", "ci_low", "ci_high", "n_fit", "n_eval")}
            for m, r in sorted(full.items(), key=lambda kv: -np.nan_to_num(kv[1]["spearman"]))
        },
        "by_design": pq.read_table(folder / "evaluation_by_design.parquet").to_pylist(),
        "comparison": pq.read_table(folder / "comparison.parquet").to_pylist(),
        "cost_curves": curves,
        "noise": params.get("noise"),
        "chosen": params.get("chosen"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--run", type=Path, default=Path("runs/bench-fidelity"))
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.toml")
    parser.add_argument("--mixture", type=int, default=300)
    parser.add_argument("--within", type=int, default=140)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--ns", default="8,16,24", help="GRASP fit-subset counts n (vs 10n)")
    parser.add_argument("--bootstrap", type=int, default=2000)
    args = parser.parse_args()
    ns = [int(x) for x in args.ns.split(",") if x.strip()]
    start = time.perf_counter()
    common = build_run(args, ns)
    result = {
        "benchmark": "fidelity",
        "config": str(args.config),
        "design": {"mixture": args.mixture, "within": args.within},
        **summarize(args.run),
        "grasp_n_vs_datamodels_10n": tenth_of_the_cost(args.run, common, ns, args.bootstrap),
        "wall_s": time.perf_counter() - start,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
