"""Assemble ``RUN/report/index.html`` from the run's tables: evaluation, LCB, cost curve, curation."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from grasp_cli.artifacts.atomic import artifact_dir
from grasp_cli.artifacts.manifest import (
    build_manifest,
    folder_digest,
    read_manifest,
    require,
    write_manifest,
)
from grasp_cli.artifacts.tables import read_table
from grasp_cli.context import StageContext
from grasp_cli.report import plots

ADDITIVE = ("additive", "trak", "cosine")


def _table_html(rows: list[dict], columns: list[str], digits: int = 3) -> str:
    def cell(value: object) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            if value == float("inf"):
                return "∞"
            return "–" if not np.isfinite(value) else f"{value:.{digits}f}"
        return html.escape(str(value))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


LCB_ROWS_PER_METHOD = 8


def lcb_summary(rows: list[dict], per_method: int) -> tuple[list[dict], int]:
    """Each method's best ``per_method`` candidates (plus the chosen one) at its full n_fit."""
    full_n: dict[str, int] = {}
    for r in rows:
        full_n[r["method"]] = max(full_n.get(r["method"], 0), r["n_fit"])
    shown = []
    for method in sorted(full_n):
        ranked = sorted(
            (r for r in rows if r["method"] == method and r["n_fit"] == full_n[method]),
            key=lambda r: -r["lcb"],
        )
        top = ranked[:per_method]
        top += [r for r in ranked[per_method:] if r.get("chosen")]
        shown += top
    return shown, len(rows)


def evaluation_pivot(evaluation: pa.Table) -> tuple[list[dict], list[str]]:
    """Rows per method (all fit subsets), a column per task with 'ρ [lo, hi]'."""
    rows = [
        r
        for r in evaluation.to_pylist()
        if r["n_fit"] == max(evaluation.column("n_fit").to_pylist()) or r["method"] != "grasp"
    ]
    full_n = {}
    for r in rows:
        full_n[r["method"]] = max(full_n.get(r["method"], 0), r["n_fit"])
    rows = [r for r in rows if r["n_fit"] == full_n[r["method"]]]
    tasks = sorted({r["task"] for r in rows if r["task"] != "mean"}) + ["mean"]
    table: dict[str, dict] = {}
    for r in rows:
        entry = table.setdefault(r["method"], {"method": r["method"]})
        entry[r["task"]] = f"{r['spearman']:.3f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
        if r["task"] == "mean":
            entry["_sort"] = r["spearman"]
    ordered = sorted(table.values(), key=lambda e: -np.nan_to_num(e.get("_sort", -2), nan=-2))
    return ordered, ["method", *tasks]


def run_report(ctx: StageContext) -> str:
    layout = ctx.layout
    require(layout, "surrogate", ctx.config, force=True, check_config=False)
    surrogate = layout.surrogate
    evaluation = read_table(surrogate / "evaluation.parquet")
    lcb = read_table(surrogate / "lcb.parquet")
    params = json.loads((surrogate / "params.json").read_text())
    noise = params.get("noise", {})
    ceiling = noise.get("ceiling")
    have_plots = plots.available()
    sections: list[str] = []

    with artifact_dir(layout.report) as out:
        pivot, columns = evaluation_pivot(evaluation)
        mean_rows = [r for r in evaluation.to_pylist() if r["task"] == "mean"]
        full = {}
        for r in mean_rows:
            if r["method"] not in full or r["n_fit"] > full[r["method"]]["n_fit"]:
                full[r["method"]] = r
        sections.append(
            "<h2>Held-out evaluation</h2><p>Spearman correlation between predicted and measured "
            "utility (−task loss) across held-out <code>eval</code> subsets that no fitting or "
            "tuning step saw; 95 % bootstrap intervals. The mean over tasks is the task-level "
            "rank correlation for counterfactual subset fidelity.</p>"
        )
        if noise:
            sections.append(
                f"<p><b>Noise ceiling:</b> seed-to-seed Spearman ρ = {noise.get('mean', float('nan')):.3f} over "
                f"{noise.get('n_subsets', 0)} subsets retrained with a second seed, so a predictor of the "
                f"expected utility can reach at most about √ρ = {ceiling:.3f} against one measurement.</p>"
                if ceiling is not None
                else "<p>Noise ceiling: not measured (retrain.repeat_subsets = 0).</p>"
            )
        sections.append(_table_html(pivot, columns))
        if have_plots:
            plots.method_comparison(list(full.values()), out / "methods.png", ceiling)
            sections.append('<img src="methods.png" alt="method comparison">')

        predictions_path = surrogate / "predictions.parquet"
        if have_plots and predictions_path.exists():
            predictions = read_table(predictions_path).to_pylist()
            best_additive = max(
                (m for m in full if m in ADDITIVE or m.startswith(ADDITIVE)),
                key=lambda m: np.nan_to_num(full[m]["spearman"], nan=-2),
                default=None,
            )
            best_other = max(
                (m for m in full if m not in ("grasp", "constant")),
                key=lambda m: np.nan_to_num(full[m]["spearman"], nan=-2),
                default=None,
            )
            shown = [m for m in dict.fromkeys(["grasp", best_other, best_additive]) if m]
            panels = []
            per_task = {
                (r["method"], r["task"]): r["spearman"]
                for r in evaluation.to_pylist()
                if r["n_fit"] == full.get(r["method"], {}).get("n_fit")
            }
            for method in shown:
                for task in sorted({p["task"] for p in predictions}):
                    chosen = [
                        p
                        for p in predictions
                        if p["method"] == method and p["task"] == task and p["role"] == "eval"
                    ]
                    if chosen:
                        panels.append(
                            (
                                task,
                                method,
                                np.array([p["predicted_utility"] for p in chosen]),
                                np.array([p["measured_utility"] for p in chosen]),
                                per_task.get((method, task), float("nan")),
                            )
                        )
            if panels:
                plots.predicted_vs_measured(panels, out / "scatter.png")
                sections.append(
                    "<h3>Predicted against measured (eval subsets)</h3>"
                    '<img src="scatter.png" alt="predicted vs measured">'
                )

        by_design_path = surrogate / "evaluation_by_design.parquet"
        if by_design_path.exists():
            by_design = read_table(by_design_path).to_pylist()
            designs = sorted({r["design"] for r in by_design})
            table = {}
            for r in by_design:
                table.setdefault(r["method"], {"method": r["method"]})[r["design"]] = r["spearman"]
            counts = {r["design"]: r["n_eval"] for r in by_design}
            sections.append(
                "<h3>By subset design</h3><p>Mean Spearman over tasks on the eval subsets of each design "
                "("
                + ", ".join(f"{d}: {counts[d]} subsets" for d in designs)
                + "). Mixture subsets "
                "vary the domain mix; <code>within</code> subsets have one size and the corpus's domain "
                "proportions, so only example-level information can rank them.</p>"
            )
            sections.append(
                _table_html(sorted(table.values(), key=lambda e: e["method"]), ["method", *designs])
            )

        grasp_curve = [
            (r["n_fit"], r["spearman"], r["ci_low"], r["ci_high"])
            for r in mean_rows
            if r["method"] == "grasp"
        ]
        sections.append(
            "<h2>Artifact cost</h2><p>GRASP's held-out fidelity against the number of "
            "retraining runs it was fitted on (the LCB protocol rerun on each prefix).</p>"
        )
        sections.append(
            _table_html(
                [
                    {"n_fit": p[0], "spearman": p[1], "ci_low": p[2], "ci_high": p[3]}
                    for p in sorted(grasp_curve)
                ],
                ["n_fit", "spearman", "ci_low", "ci_high"],
            )
        )
        if have_plots and grasp_curve:
            additive = [full[m]["spearman"] for m in full if m.startswith(ADDITIVE)]
            plots.cost_curve(grasp_curve, out / "cost.png", max(additive) if additive else None)
            sections.append('<img src="cost.png" alt="cost curve">')

        lcb_rows, lcb_total = lcb_summary(lcb.to_pylist(), LCB_ROWS_PER_METHOD)
        lcb_columns = [c for c in lcb.column_names if c not in ("values",)]
        sections.append(
            "<h2>Strictly finite LCB protocol</h2><p>Candidates scored by repeated K-fold "
            "cross-validation on fit subsets only; the highest lower confidence bound wins. Shown: "
            f"the best {LCB_ROWS_PER_METHOD} of each method on all fit subsets (and the chosen one); "
            f"all {lcb_total} rows, cost-curve refits included, are in <code>surrogate/lcb.parquet</code>.</p>"
        )
        sections.append(_table_html(lcb_rows, lcb_columns))

        sections.append(_selection_section(ctx, out, have_plots))
        manifest = read_manifest(layout.corpus)
        header = (
            f"<p>Run <code>{html.escape(str(layout.root))}</code> · corpus {manifest.extra.get('rows')} "
            f"rows · generated by grasp {manifest.package_version}</p>"
            if manifest
            else ""
        )
        page = _PAGE.format(
            body=header + "\n".join(sections),
            params=html.escape(
                json.dumps(
                    {k: v for k, v in params.items() if k != "tasks"}, indent=2, default=str
                )[:20000]
            ),
        )
        (out / "index.html").write_text(page, encoding="utf-8")
        write_manifest(
            out, build_manifest(layout, "report", ctx.config, content=folder_digest(out))
        )
    return f"report: {layout.report / 'index.html'}"


def loop_rows(layout) -> list[dict]:
    """Per closed-loop round: what the surrogate predicted for its proposal and what training on
    the proposal measured (mean over tasks of −loss, nats; the gap is the optimizer's curse)."""
    from grasp_cli.artifacts.results import read_results
    from grasp_cli.retrain.loop import finished_rounds, load_round, round_folder

    rows = []
    loop = layout.path("loop")
    for number in finished_rounds(loop):
        folder = round_folder(loop, number)
        proposal = json.loads((folder / "proposal.json").read_text(encoding="utf-8"))
        predicted = proposal.get("predicted_utilities") or {}
        results = [
            r
            for r in read_results(folder).to_pylist()
            if r["subset_id"] == 0 and r["metric"] == "loss"
        ]
        measured = {r["task"]: r["utility"] for r in results}
        tasks = sorted(set(predicted) & set(measured))
        rows.append(
            {
                "round": number,
                "subsets": len(load_round(folder, 0)["kinds"]),
                "predicted": float(np.mean([predicted[t] for t in tasks]))
                if tasks
                else float("nan"),
                "measured": float(np.mean([measured[t] for t in tasks])) if tasks else float("nan"),
            }
        )
        rows[-1]["gap"] = rows[-1]["predicted"] - rows[-1]["measured"]
    return rows


def _selection_section(ctx: StageContext, out: Path, have_plots: bool) -> str:
    layout = ctx.layout
    parts = []
    selected_path = layout.selection / "selected.parquet"
    if selected_path.exists():
        selected = read_table(selected_path)
        domains = selected.column("domain").to_pylist()
        counts = {d: domains.count(d) for d in sorted(set(domains))}
        parts.append(
            f"<h2>Selection</h2><p>{len(domains)} examples selected. Domain mix: "
            + ", ".join(f"{html.escape(d)} {c}" for d, c in counts.items())
            + "</p>"
        )
    rounds = loop_rows(layout)
    if rounds:
        parts.append(
            "<h2>Closed loop</h2><p>Each round measured the selection of the moment and subsets "
            "near it, then refit the surrogate on them (fit subsets only) and selected again. "
            "<b>predicted</b>: the surrogate's utility of the proposal when it was made; "
            "<b>measured</b>: training on it (mean over tasks of −loss, nats). A positive gap is "
            "the optimizer's curse; later rounds should shrink it.</p>"
        )
        parts.append(_table_html(rounds, ["round", "subsets", "predicted", "measured", "gap"], 4))
    curation = read_manifest(layout.curation)
    if curation is not None and curation.complete:
        from grasp_cli.artifacts.results import read_results
        from grasp_cli.select.outcomes import summarize

        summary, differences = summarize(read_results(layout.curation).to_pylist())
        tasks = sorted({r["task"] for r in summary if r["task"] != "mean"})
        table: dict[str, dict] = {}
        for r in summary:
            table.setdefault(r["selection"], {"selection": r["selection"]})[r["task"]] = (
                f"{r['loss']:.4f} ± {r['std']:.4f}"
            )
        seeds = max((r["seeds"] for r in summary), default=0)
        parts.append(
            "<h2>Curation check</h2><p>Measured task loss (nats, lower is better) after training "
            f"with the retrain recipe on each selection of the same size; mean ± std over {seeds} "
            "seed(s), the same seeds for every selection (<code>whole</code>: the whole corpus, "
            "a reference line, not the same budget).</p>"
        )
        ordered = sorted(table.values(), key=lambda e: e["selection"] != "grasp")
        parts.append(_table_html(ordered, ["selection", *tasks, "mean"], digits=4))
        if differences:
            parts.append(
                "<h3>GRASP − each other selection</h3><p>Difference of mean task loss, paired by "
                "seed, with a 95 % t interval over seeds (negative: GRASP's selection trained the "
                "better model; an interval that contains 0 is not a difference beyond seed "
                "noise). <b>best</b> marks the strongest other selection.</p>"
            )
            parts.append(
                _table_html(
                    differences,
                    ["baseline", "difference", "ci_low", "ci_high", "seeds", "best"],
                    digits=4,
                )
            )
            if have_plots:
                plots.curation_differences(differences, out / "curation.png")
                parts.append('<img src="curation.png" alt="curation differences">')
    return "\n".join(parts)


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>grasp report</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child {{ text-align: left; }}
img {{ max-width: 100%; display: block; margin: 1em 0; }}
pre {{ background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 12px; }}
</style></head><body>
<h1>grasp report</h1>
{body}
<h2>Chosen surrogate</h2><pre>{params}</pre>
</body></html>
"""
