"""What the report shows, as pure functions: rows in → rows or HTML out (no files).

Order of the page and why:

1. **Verdict** — one line a reader can act on: which method ranks first on held-out subsets,
   and GRASP against the best other method with the paired bootstrap interval, read as beyond
   noise or within noise. It never flatters GRASP: a better baseline is named as the winner.
2. **Glossary** — each method and selection that appears, and the units of every column.
3. **Held-out evaluation** — the Spearman table and bar chart (the key result at a glance),
   the paired comparison, the by-design table, predicted-against-measured scatter plots.
4. **Artifact cost** — GRASP's fidelity against the number of retraining runs.
5. **Selection** — domain composition against the corpus, the top-gain examples per task with
   text snippets and their alignment / redundancy parts, the top of the selection.
6. **Curation check** and **closed loop** — what training on the selections measured.
7. **LCB protocol** and the raw parameters, collapsed (for the person debugging a fit).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from grasp_cli.report import plots
from grasp_cli.report.html import details, esc, figure, number, significant, table

ADDITIVE = ("additive", "trak", "cosine")
LCB_ROWS_PER_METHOD = 8
SNIPPET_CHARS = 160
MAX_SCATTER_TASKS = 8
COMPARISON_COLUMNS = ["suite", "baseline", "GRASP ρ", "baseline ρ", "difference", "interval",
                      "n_eval", "best", "reading"]  # fmt: skip

METHODS = {
    "grasp": "GRASP, the fitted subset surrogate. Per task, Û(S) = c + a⟨r + Δ, m_S⟩ − (b/2)"
    "‖m_S‖²_G on the subset's aggregated gradient sketch m_S: alignment with the task gradient "
    "minus a quadratic redundancy penalty; hyperparameters chosen by the LCB protocol on fit "
    "subsets only.",
    "additive": "GRASP with b = 0: the alignment term alone, no redundancy penalty (an additive "
    "per-example score). Shows what the quadratic term adds.",
    "trak": "TRAK as its authors define it, in grasp: margin gradients, the Q weights, "
    "τ = φᵀ(ΦᵀΦ + λI)⁻¹ r with λ chosen on fit subsets; an additive score mapped to utility units.",
    "trak-ref": "TRAK computed by the authors' traker library itself (a check on grasp's trak).",
    "cosine": "LESS-style gradient cosine: the mean over the subset of cos(φ_i, task gradient).",
    "datamodels": "Datamodels: ridge regression of utility on the subset's membership vector "
    "(one weight per example), fitted on the fit subsets.",
    "regmix": "RegMix-style domain-mixture regression: ridge on each subset's domain "
    "proportions. It knows the mix, not which examples.",
    "constant": "Predicts the mean fit utility for every subset: Spearman 0 by definition (the "
    "floor).",
}

SELECTIONS = {
    "grasp": "GRASP's selection: greedy maximization of the surrogate objective at the budget.",
    "grasp-trust": "GRASP's selection kept inside the trust region (domain shares the fit "
    "subsets covered).",
    "random": "A uniform random sample of the budget.",
    "additive": "Top-B examples by the additive (b = 0) score.",
    "trak": "Top-B examples by the TRAK score.",
    "domain-match": "The budget spread evenly over the corpus domains the tasks come from.",
    "regmix": "The mixture regression's best domain mixture, sampled uniformly within domains.",
    "dsir": "DSIR: hashed n-gram importance resampling towards the tasks (grasp's version).",
    "dsir-ref": "DSIR computed by the authors' data-selection package.",
    "whole": "The whole corpus: a reference line, not the same budget.",
}

UNITS = [
    (
        "utility",
        "−(mean task loss), in nats per token for language models; higher is better. "
        "Every predicted_utility / measured_utility is on this scale.",
    ),
    (
        "Spearman ρ",
        "Rank correlation between predicted and measured utility over the held-out eval "
        "subsets (retrained subsets no fitting or tuning step saw); per task, and 'mean' = the "
        "average over tasks. 1 = the method ranks subsets exactly as training does.",
    ),
    (
        "[lo, hi]",
        "95 % bootstrap interval over eval subsets. A paired interval (comparison) resamples "
        "the same subsets for both methods, so it is about the difference itself.",
    ),
    (
        "noise ceiling",
        "√ of the seed-to-seed Spearman of subsets retrained with two seeds: about the best "
        "ρ any predictor of expected utility can reach against one noisy measurement.",
    ),
    ("n_fit / n_eval", "Retrained subsets used to fit / to evaluate."),
    (
        "utility_gain",
        "An example's predicted change of a task's utility against the reference set "
        "(alignment − redundancy). alignment: the gain from pointing along the task gradient; "
        "redundancy: the penalty for pointing where the reference set already is.",
    ),
    (
        "objective_gain",
        "How much the selection objective rose when the greedy step added the example.",
    ),
    (
        "curation loss",
        "Measured task loss (nats, lower is better) after training on a selection; "
        "differences are paired by seed with a 95 % t interval.",
    ),
]


@dataclass
class ReportInputs:
    """Everything the page shows, already read from the run (row lists, plain values).

    Optional parts are empty when their artifact is absent. ``top_examples``: task -> rows
    (id, task, utility_gain, alignment, redundancy, domain, snippet); ``snippet`` is None for
    image corpora. ``selection_domains``: selection name -> domain -> count.
    """

    run: str
    evaluation: list[dict]
    lcb: list[dict]
    lcb_columns: list[str]
    params: dict
    package_version: str = ""
    model_kind: str = ""
    corpus_rows: int | None = None
    text: bool = True
    comparison: list[dict] = field(default_factory=list)
    by_design: list[dict] = field(default_factory=list)
    predictions: list[dict] = field(default_factory=list)
    designs: dict[int, str] = field(default_factory=dict)
    corpus_domains: dict[str, int] = field(default_factory=dict)
    selected: list[dict] = field(default_factory=list)
    selection_domains: dict[str, dict[str, int]] = field(default_factory=dict)
    top_examples: dict[str, list[dict]] = field(default_factory=dict)
    score_reference: str = "corpus"
    curation_results: list[dict] = field(default_factory=list)
    repeats: dict[str, dict] = field(default_factory=dict)  # selection -> rows, slots, share
    loop: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- rows (pure)


def _rho(value: Any) -> float:
    """A Spearman for ranking: NaN sorts last."""
    return float(np.nan_to_num(value, nan=-2.0))


def full_fit(evaluation: list[dict]) -> dict[str, dict[str, dict]]:
    """method -> task -> the evaluation row at that method's largest n_fit (the cost curve's
    smaller refits left out)."""
    largest: dict[str, int] = {}
    for r in evaluation:
        largest[r["method"]] = max(largest.get(r["method"], 0), r["n_fit"])
    out: dict[str, dict[str, dict]] = {}
    for r in evaluation:
        if r["n_fit"] == largest[r["method"]]:
            out.setdefault(r["method"], {})[r["task"]] = r
    return out


def ranked_methods(full: dict[str, dict[str, dict]]) -> list[str]:
    """Methods by mean-over-tasks Spearman, best first (NaN last, then by name)."""
    return sorted(full, key=lambda m: (-_rho(full[m].get("mean", {}).get("spearman")), m))


@dataclass
class Verdict:
    """The top line. winners: the method(s) with the highest mean Spearman (more than one on
    an exact tie). outcome: GRASP against the best other method — 'win' / 'lose' (beyond
    noise), 'tie' (within noise), 'unknown' (no paired interval or no GRASP)."""

    winners: list[str]
    outcome: str
    html: str


def _reading(low: float, high: float) -> str:
    if low > 0:
        return "beyond noise: GRASP better"
    if high < 0:
        return "beyond noise: GRASP worse"
    return "within noise"


def verdict(evaluation: list[dict], comparison: list[dict]) -> Verdict:
    """Who ranks first on held-out subsets (mean Spearman at each method's full n_fit), and
    GRASP − the best other method (constant left out) with its paired bootstrap interval
    from ``comparison`` (suite 'all')."""
    full = full_fit(evaluation)
    means = {m: t["mean"] for m, t in full.items() if "mean" in t}
    if not means:
        return Verdict([], "unknown", "No held-out evaluation rows: nothing to compare.")
    order = ranked_methods({m: full[m] for m in means})
    top = means[order[0]]
    winners = [m for m in order if means[m]["spearman"] == top["spearman"]]
    names = " and ".join(f"<b>{esc(m)}</b>" for m in winners)
    lead = (
        f"{names} {'tie for' if len(winners) > 1 else 'ranks'} first on held-out subsets: "
        "mean Spearman ρ = "
        f"{top['spearman']:.3f} [{top['ci_low']:.2f}, {top['ci_high']:.2f}] over "
        f"{top['n_eval']} eval subsets."
    )
    others = [m for m in order if m not in ("grasp", "constant")]
    if "grasp" not in means or not others:
        return Verdict(winners, "unknown", lead + " No GRASP-against-baseline comparison.")
    rival = others[0]
    row = next(
        (r for r in comparison if r.get("suite") == "all" and r.get("baseline") == rival), None
    )
    grasp_rho, rival_rho = means["grasp"]["spearman"], means[rival]["spearman"]
    head = (
        f" GRASP (ρ = {grasp_rho:.3f}) vs the best other method, {esc(rival)} "
        f"(ρ = {rival_rho:.3f}): "
    )
    if row is None:
        return Verdict(
            winners,
            "unknown",
            lead + head + f"{grasp_rho - rival_rho:+.3f}; no paired interval "
            "(surrogate/comparison.parquet has no row for it), so whether this is beyond noise "
            "is not known.",
        )
    low, high = row["ci_low"], row["ci_high"]
    reading = _reading(low, high)
    outcome = "win" if low > 0 else "lose" if high < 0 else "tie"
    interval = f"{row['difference']:+.3f} [{low:+.3f}, {high:+.3f}] (paired 95 % interval)"
    return Verdict(winners, outcome, lead + head + f"{interval} — <b>{reading}</b>.")


def glossary(methods: Sequence[str], selections: Sequence[str]) -> str:
    """Definitions of the methods and selections that appear, and of the columns' units."""

    def entries(names: Sequence[str], known: dict[str, str]) -> str:
        return "".join(
            f"<dt>{esc(n)}</dt><dd>"
            + esc(known.get(n, known.get(n.split("@")[0], "(no description in this report)")))
            + "</dd>"
            for n in names
        )

    parts = [
        '<h3 class="glossary">Methods (surrogates of subset utility)</h3>',
        f'<dl class="glossary">{entries(methods, METHODS)}</dl>',
    ]
    if selections:
        parts += [
            '<h3 class="glossary">Selections (curation check)</h3>',
            f'<dl class="glossary">{entries(selections, SELECTIONS)}</dl>',
        ]
    parts += [
        '<h3 class="glossary">Columns and units</h3>',
        '<dl class="glossary">'
        + "".join(f"<dt>{esc(n)}</dt><dd>{esc(d)}</dd>" for n, d in UNITS)
        + "</dl>",
    ]
    return "".join(parts)


def evaluation_pivot(evaluation: list[dict]) -> tuple[list[dict], list[str]]:
    """Rows per method at its full n_fit, a column per task with 'ρ [lo, hi]', best first."""
    full = full_fit(evaluation)
    tasks = sorted({t for m in full.values() for t in m if t != "mean"}) + ["mean"]
    rows = []
    for method in ranked_methods(full):
        entry: dict[str, Any] = {"method": method}
        for task, r in full[method].items():
            entry[task] = f"{r['spearman']:.3f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
            entry["n_fit"] = r["n_fit"]
        rows.append(entry)
    return rows, ["method", *tasks, "n_fit"]


def comparison_rows(comparison: list[dict]) -> list[dict]:
    """The paired differences GRASP − each method, suite 'all' first, each with its reading."""
    suites = sorted({r["suite"] for r in comparison}, key=lambda s: (s != "all", s))
    rows = []
    for suite in suites:
        for r in sorted(
            (r for r in comparison if r["suite"] == suite), key=lambda r: r["difference"]
        ):
            rows.append(
                {
                    **r,
                    "GRASP ρ": r["method_spearman"],
                    "baseline ρ": r["baseline_spearman"],
                    "interval": f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]",
                    "reading": _reading(r["ci_low"], r["ci_high"]),
                }
            )
    return rows


def lcb_summary(rows: list[dict], per_method: int) -> tuple[list[dict], int]:
    """Each method's best ``per_method`` candidates (plus the chosen one) at its full n_fit."""
    full_n: dict[str, int] = {}
    for r in rows:
        full_n[r["method"]] = max(full_n.get(r["method"], 0), r["n_fit"])
    shown = []
    for method in sorted(full_n):
        ranked = sorted(
            (r for r in rows if r["method"] == method and r["n_fit"] == full_n[method]),
            key=lambda r: -np.nan_to_num(r["lcb"], nan=-np.inf),
        )
        shown += ranked[:per_method] + [r for r in ranked[per_method:] if r.get("chosen")]
    return shown, len(rows)


def scatter_panels(
    predictions: list[dict],
    designs: dict[int, str],
    evaluation: list[dict],
    max_tasks: int = MAX_SCATTER_TASKS,
) -> tuple[list[plots.ScatterPanel], list[str], list[str]]:
    """(panels, methods, tasks) of predicted against measured utility on eval subsets.

    Methods: GRASP first, then the others by mean Spearman (the constant predictor left out:
    a vertical line says nothing); tasks sorted, at most ``max_tasks``.
    """
    full = full_fit(evaluation)
    eval_rows = [p for p in predictions if p["role"] == "eval"]
    present = {p["method"] for p in eval_rows} - {"constant"}
    methods = sorted(
        present,
        key=lambda m: (m != "grasp", -_rho(full.get(m, {}).get("mean", {}).get("spearman")), m),
    )
    tasks = sorted({p["task"] for p in eval_rows})[:max_tasks]
    panels = []
    for method in methods:
        for task in tasks:
            chosen = [p for p in eval_rows if p["method"] == method and p["task"] == task]
            if not chosen:
                continue
            panels.append(
                plots.ScatterPanel(
                    task=task,
                    method=method,
                    predicted=np.array([p["predicted_utility"] for p in chosen], dtype=float),
                    measured=np.array([p["measured_utility"] for p in chosen], dtype=float),
                    designs=np.array([designs.get(int(p["subset_id"]), "?") for p in chosen]),
                    rho=float(full.get(method, {}).get(task, {}).get("spearman", math.nan)),
                )
            )
    return panels, methods, tasks


def domain_shares(
    corpus: dict[str, int], selections: dict[str, dict[str, int]]
) -> tuple[list[str], dict[str, list[float]], list[dict]]:
    """(domains, name -> share of each domain, table rows). Names: 'corpus' then each
    selection; a table row per name with 'share (count)' per domain and the total."""
    groups = {"corpus": corpus, **selections}
    domains = sorted({d for counts in groups.values() for d in counts})
    shares: dict[str, list[float]] = {}
    rows = []
    for name, counts in groups.items():
        total = sum(counts.values())
        shares[name] = [counts.get(d, 0) / total if total else math.nan for d in domains]
        row: dict[str, Any] = {"": name, "examples": total}
        for domain, share in zip(domains, shares[name], strict=True):
            row[domain] = f"{share:.2f} ({counts.get(domain, 0)})"
        rows.append(row)
    return domains, shares, rows


def top_by_task(rows: list[dict], n: int) -> dict[str, list[dict]]:
    """task -> its ``n`` rows with the largest utility_gain, best first (ties by id)."""
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    return {
        task: sorted(items, key=lambda r: (-_rho(r["utility_gain"]), r["id"]))[:n]
        for task, items in sorted(by_task.items())
    }


def byte_snippet(tokens: Sequence[int], chars: int = SNIPPET_CHARS) -> str:
    """The text of a byte-token row (ids < 256 are bytes; 256 is padding), at most ``chars``
    characters, invalid UTF-8 replaced, line breaks shown as ⏎."""
    text = bytes(t for t in tokens if 0 <= t < 256).decode("utf-8", errors="replace")
    text = text.replace("\r\n", "⏎").replace("\n", "⏎").replace("\t", " ")
    return text[:chars] + ("…" if len(text) > chars else "")


def curation_tables(results: list[dict]) -> tuple[list[dict], list[str], list[dict], int]:
    """(summary rows per selection with 'mean ± std' per task, their columns, paired
    differences GRASP − each other selection with their reading, seeds)."""
    from grasp_cli.select.outcomes import summarize

    summary, differences = summarize(results)
    tasks = sorted({r["task"] for r in summary if r["task"] != "mean"})
    table_rows: dict[str, dict] = {}
    for r in summary:
        table_rows.setdefault(r["selection"], {"selection": r["selection"]})[r["task"]] = (
            f"{r['loss']:.4f} ± {r['std']:.4f}"
        )
    means = {r["selection"]: r["loss"] for r in summary if r["task"] == "mean"}
    ordered = sorted(
        table_rows.values(), key=lambda e: (e["selection"] != "grasp", means.get(e["selection"], 0))
    )
    seeds = max((r["seeds"] for r in summary), default=0)
    diffs = [
        {**d, "reading": _curation_reading(d["ci_low"], d["ci_high"])}
        for d in sorted(differences, key=lambda d: d["difference"])
    ]
    return ordered, ["selection", *tasks, "mean"], diffs, seeds


def curation_verdict(results: list[dict]) -> str:
    """One line: GRASP's selection against the best other selection (lowest mean loss), the
    paired difference of mean task loss with its t interval, and its reading ('' if none)."""
    _, _, differences, seeds = curation_tables(results)
    best = next((d for d in differences if d["best"]), None)
    if best is None:
        return ""
    return (
        f"GRASP's selection vs the best other selection, <b>{esc(best['baseline'])}</b>: "
        f"{best['difference']:+.4f} [{best['ci_low']:+.4f}, {best['ci_high']:+.4f}] nats of mean "
        f"task loss (GRASP − other, lower is better; 95 % t interval over {seeds} seeds) — "
        f"<b>{best['reading']}</b>."
    )


def _curation_reading(low: float, high: float) -> str:
    if high < 0:
        return "GRASP better (beyond seed noise)"
    if low > 0:
        return "GRASP worse (beyond seed noise)"
    return "within seed noise"


# ---------------------------------------------------------------- sections (HTML)


def header_html(inputs: ReportInputs, v: Verdict, notes: Sequence[str]) -> str:
    """Run info line, the verdict, and notes (stale inputs, skipped parts)."""
    noise = inputs.params.get("noise") or {}
    ceiling = noise.get("ceiling")
    info = [f"run <code>{esc(inputs.run)}</code>"]
    if inputs.corpus_rows is not None:
        info.append(f"corpus {inputs.corpus_rows} rows")
    tasks = inputs.params.get("task_names") or []
    if tasks:
        info.append(f"{len(tasks)} task(s): {esc(', '.join(tasks))}")
    if inputs.model_kind:
        info.append(f"model {esc(inputs.model_kind)}")
    info.append(
        f"n_fit {inputs.params.get('n_fit', '?')}, n_eval {inputs.params.get('n_eval', '?')}"
    )
    if ceiling is not None:
        info.append(f"noise ceiling {number(float(ceiling))}")
    if inputs.package_version:
        info.append(f"grasp {esc(inputs.package_version)}")
    klass = {"win": "verdict win", "lose": "verdict lose"}.get(v.outcome, "verdict")
    curation = curation_verdict(inputs.curation_results) if inputs.curation_results else ""
    if curation:
        tone = (
            " win" if "GRASP better" in curation else " lose" if "GRASP worse" in curation else ""
        )
        curation = (
            f'<p class="verdict{tone}" id="curation-verdict"><b>Curation check:</b> {curation}</p>'
        )
    notes = "".join(f'<p class="note">{esc(n)}</p>' for n in notes)
    return (
        f'<p class="runinfo">{" · ".join(info)}</p>'
        f'<p class="{klass}" id="verdict"><b>Verdict:</b> {v.html}</p>{curation}{notes}'
    )


def evaluation_html(inputs: ReportInputs, have_plots: bool) -> str:
    """Held-out table + bar chart, paired comparison, by-design table, scatter grid."""
    params = inputs.params
    noise = params.get("noise") or {}
    ceiling = noise.get("ceiling")
    full = full_fit(inputs.evaluation)
    parts = [
        "<p>Spearman correlation between predicted and measured utility (−task loss) across "
        "held-out <code>eval</code> subsets that no fitting or tuning step saw; 95 % bootstrap "
        "intervals. <b>mean</b> is the average over tasks.</p>"
    ]
    if noise:
        parts.append(
            f"<p><b>Noise ceiling:</b> seed-to-seed Spearman ρ = {number(noise.get('mean'))} "
            f"over {noise.get('n_subsets', 0)} subsets retrained with a second seed, so a "
            f"predictor of the expected utility can reach at most about √ρ = {number(ceiling)} "
            "against one measurement.</p>"
            if ceiling is not None
            else "<p>Noise ceiling: not measured (retrain.repeat_subsets = 0).</p>"
        )
    pivot, columns = evaluation_pivot(inputs.evaluation)
    parts.append(table(pivot, columns))
    skipped = params.get("skipped") or {}
    if skipped:
        parts.append(
            "<p>Not evaluated: "
            + "; ".join(f"<code>{esc(m)}</code> ({esc(why)})" for m, why in skipped.items())
            + "</p>"
        )
    if have_plots:
        mean_rows = [t["mean"] for t in full.values() if "mean" in t]
        parts.append(
            figure(
                plots.method_comparison(mean_rows, ceiling),
                "method comparison",
                "Mean-over-tasks Spearman per method with 95 % bootstrap intervals; GRASP in red.",
            )
        )
    if inputs.comparison:
        parts.append(
            "<h3>GRASP against each method, paired</h3><p>Difference of mean-over-tasks "
            "Spearman, GRASP − method, on the same eval subsets, with a paired bootstrap 95 % "
            "interval (every resample scores both methods on the same subsets). An interval "
            "that contains 0 is within noise. <b>best</b>: the strongest other method on that "
            "suite of subsets ('all', or one design).</p>"
        )
        parts.append(
            table(
                comparison_rows(inputs.comparison),
                COMPARISON_COLUMNS,
                formats={"difference": lambda v: f"{v:+.3f}"},
            )
        )
    if inputs.by_design:
        designs = sorted({r["design"] for r in inputs.by_design})
        counts = {r["design"]: r["n_eval"] for r in inputs.by_design}
        rows: dict[str, dict] = {}
        for r in inputs.by_design:
            rows.setdefault(r["method"], {"method": r["method"]})[r["design"]] = r["spearman"]
        order = ranked_methods(full)
        parts.append(
            "<h3>By subset design</h3><p>Mean Spearman over tasks on the eval subsets of each "
            "design ("
            + ", ".join(f"{esc(d)}: {counts[d]} subsets" for d in designs)
            + "). Mixture subsets vary the domain mix; <code>within</code> subsets have one "
            "size and the corpus's domain proportions, so only example-level information can "
            "rank them. Designs with fewer than 5 eval subsets are left out.</p>"
        )
        parts.append(
            table(
                sorted(
                    rows.values(),
                    key=lambda e: order.index(e["method"]) if e["method"] in order else 99,
                ),
                ["method", *designs],
            )
        )
    if have_plots and inputs.predictions:
        panels, methods, tasks = scatter_panels(
            inputs.predictions, inputs.designs, inputs.evaluation
        )
        if panels:
            all_tasks = {p["task"] for p in inputs.predictions}
            more = (
                f" The first {len(tasks)} of {len(all_tasks)} tasks are shown."
                if len(all_tasks) > len(tasks)
                else ""
            )
            parts.append(
                "<h3>Predicted against measured (eval subsets)</h3><p>One row per method, one "
                "column per task; each column shares its axis range across methods and between "
                "x and y, so the dashed line is y = x (perfect calibration) and a flat cloud is "
                "a method that cannot tell subsets apart. Colour: the subset's design. ρ: the "
                f"held-out Spearman.{more}</p>"
            )
            parts.append(
                figure(plots.scatter_grid(panels, methods, tasks), "predicted vs measured")
            )
    return "".join(parts)


def cost_html(inputs: ReportInputs, have_plots: bool) -> str:
    """GRASP's mean held-out Spearman per number of fit subsets (table and curve)."""
    points = sorted(
        (r["n_fit"], r["spearman"], r["ci_low"], r["ci_high"])
        for r in inputs.evaluation
        if r["method"] == "grasp" and r["task"] == "mean"
    )
    if not points:
        return ""
    full = full_fit(inputs.evaluation)
    parts = [
        "<p>GRASP's held-out fidelity against the number of retraining runs it was fitted on "
        "(the LCB protocol rerun on each prefix of the fit subsets). The dashed line is the best "
        "additive baseline on all fit subsets.</p>",
        table(
            [dict(zip(("n_fit", "spearman", "ci_low", "ci_high"), p, strict=True)) for p in points],
            ["n_fit", "spearman", "ci_low", "ci_high"],
        ),
    ]
    if have_plots:
        additive = [
            t["mean"]["spearman"] for m, t in full.items() if m.startswith(ADDITIVE) and "mean" in t
        ]
        parts.append(
            figure(plots.cost_curve(points, max(additive) if additive else None), "cost curve")
        )
    return "".join(parts)


def selection_html(inputs: ReportInputs, have_plots: bool) -> str:
    """Domain composition against the corpus, top-gain examples per task, top of selection."""
    parts = []
    if inputs.selection_domains and inputs.corpus_domains:
        selected = inputs.selection_domains.get("selection", {})
        parts.append(
            f"<h3>Domain composition</h3><p>{sum(selected.values())} of "
            f"{sum(inputs.corpus_domains.values())} corpus examples selected. Each domain's "
            "share of the corpus and of the selection (and of every other curation selection "
            "in the table), as share (count): a selection far from the corpus mix has bet on "
            "some domains.</p>"
        )
        domains, shares, rows = domain_shares(inputs.corpus_domains, inputs.selection_domains)
        parts.append(table(rows, ["", "examples", *domains]))
        if have_plots:
            parts.append(
                figure(
                    plots.domain_composition(
                        domains, {"corpus": shares["corpus"], "selection": shares["selection"]}
                    ),
                    "domain composition",
                )
            )
    text = ["doc", "snippet"] if inputs.text else ["doc"]
    columns = ["rank", "id", "domain", "utility_gain", "alignment", "redundancy", *text]
    gains = {c: significant for c in ("utility_gain", "alignment", "redundancy", "objective_gain")}
    if inputs.top_examples:
        against = (
            "the whole corpus (each example's leave-one-out value)"
            if inputs.score_reference == "corpus"
            else "the current selection"
        )
        n = max(len(v) for v in inputs.top_examples.values())
        parts.append(
            f"<h3>Top {n} examples per task by utility gain</h3><p>Each example's predicted "
            f"change of the task's utility against {against}, in utility units (nats): "
            "<b>alignment</b> (how far it points along the task gradient) minus "
            "<b>redundancy</b> (the penalty for pointing where the reference set already is)."
            + ("" if inputs.text else " Image corpus: no text snippets.")
            + "</p>"
        )
        for task, rows in inputs.top_examples.items():
            ranked = [{"rank": i + 1, **r} for i, r in enumerate(rows)]
            parts.append(f"<h4>{esc(task)}</h4>")
            parts.append(table(ranked, columns, formats=gains, css="examples"))
    if inputs.selected:
        shown = inputs.selected
        parts.append(
            f"<h3>First {len(shown)} examples of the selection</h3><p>In the order the greedy "
            "selection added them; <b>objective_gain</b>: how much the objective rose.</p>"
        )
        cols = ["rank", "id", "domain", "objective_gain", *text]
        parts.append(table(shown, cols, formats=gains, css="examples"))
    return "".join(parts)


def curation_html(inputs: ReportInputs, have_plots: bool) -> str:
    """Measured loss per selection and GRASP − each other selection with error bars."""
    summary, columns, differences, seeds = curation_tables(inputs.curation_results)
    parts = [
        "<p>Measured task loss (nats, lower is better) after training with the retrain recipe "
        f"on each selection of the same size; mean ± std over {seeds} seed(s), the same seeds "
        "for every selection (<code>whole</code>: the whole corpus, a reference line, not the "
        "same budget).</p>",
        table(summary, columns, digits=4),
    ]
    if differences:
        parts.append(
            "<h3>GRASP − each other selection</h3><p>Difference of mean task loss, paired by "
            "seed, with a 95 % t interval over seeds (negative: GRASP's selection trained the "
            "better model; an interval that contains 0 is not a difference beyond seed "
            "noise). <b>best</b> marks the strongest other selection.</p>"
        )
        parts.append(
            table(
                differences,
                ["baseline", "difference", "ci_low", "ci_high", "seeds", "best", "reading"],
                digits=4,
            )
        )
        if have_plots:
            parts.append(
                figure(
                    plots.curation_differences(differences),
                    "curation differences",
                    "Bars: GRASP − other, mean task loss; whiskers: 95 % t interval over seeds "
                    "(none with one seed). Green: GRASP better beyond seed noise; red: worse.",
                )
            )
    if inputs.repeats:
        parts.append(repeats_html(inputs.repeats, summary))
    return "".join(parts)


def repeats_html(repeats: dict[str, dict], summary: list[dict]) -> str:
    """Slots each selection spent on content it already holds (rows identical to another
    selected row), beside its measured mean task loss."""
    losses = {r["selection"]: r.get("mean", "") for r in summary}
    rows = [
        {
            "selection": name,
            "rows": r["rows"],
            "repeated slots": r["slots"],
            "share": f"{100 * r['share']:.1f} %",
            "mean task loss": losses.get(name, "—"),
        }
        for name, r in sorted(repeats.items(), key=lambda item: item[1]["share"])
    ]
    return (
        "<h3>Repeated content</h3><p>Rows of each selection whose tokens (or pixels) another "
        "selected row already has: slots that add no new data. <code>corpus</code>: the whole "
        "corpus, for reference. A selector that models redundancy keeps this low when the "
        "corpus repeats itself.</p>"
        + table(rows, ["selection", "rows", "repeated slots", "share", "mean task loss"])
    )


def loop_html(rows: list[dict]) -> str:
    return (
        "<p>Each round measured the selection of the moment and subsets near it, then refit the "
        "surrogate on them (fit subsets only) and selected again. <b>predicted</b>: the "
        "surrogate's utility of the proposal when it was made; <b>measured</b>: training on it "
        "(mean over tasks of −loss, nats). A positive gap is the optimizer's curse; later rounds "
        "should shrink it.</p>"
        + table(rows, ["round", "subsets", "predicted", "measured", "gap"], 4)
    )


def lcb_html(inputs: ReportInputs) -> str:
    """The LCB candidates, collapsed: the best few per method and the chosen one."""
    rows, total = lcb_summary(inputs.lcb, LCB_ROWS_PER_METHOD)
    body = (
        "<p>Candidates scored by repeated K-fold cross-validation on fit subsets only; the "
        "highest lower confidence bound wins. Shown: the best "
        f"{LCB_ROWS_PER_METHOD} of each method on all fit subsets (and the chosen one); all "
        f"{total} rows, cost-curve refits included, are in <code>surrogate/lcb.parquet</code>."
        "</p>" + table(rows, inputs.lcb_columns)
    )
    summary = (
        f"LCB candidates: the best per method and the chosen one ({len(rows)} of {total} rows)"
    )
    return details(summary, body)


def raw_params_html(params: dict) -> str:
    text = json.dumps({k: v for k, v in params.items() if k != "tasks"}, indent=2, default=str)
    return details("surrogate/params.json", f"<pre>{esc(text[:50000])}</pre>")
