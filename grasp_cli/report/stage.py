"""`grasp report`: one self-contained ``RUN/report/index.html`` (figures embedded as PNG data
URIs, inline style, no script) that can be mailed or attached to a ticket.

read → compute → write: ``read_inputs`` gathers what the run has (only the surrogate is
required; scores, selection, curation and the closed loop are shown when present),
``render`` builds the page from those rows (``sections.py``, pure), ``run_report`` writes it
atomically with its manifest. See ``sections.py`` for what each section shows and why.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from grasp_cli.artifacts.atomic import artifact_dir
from grasp_cli.artifacts.examples import BYTE_PAD_ID
from grasp_cli.artifacts.manifest import (
    build_manifest,
    folder_digest,
    read_manifest,
    require,
    staleness,
    write_manifest,
)
from grasp_cli.artifacts.tables import read_table
from grasp_cli.context import StageContext
from grasp_cli.report import html, plots, sections
from grasp_cli.report.sections import ReportInputs

TOP_EXAMPLES = 10  # per task
TOP_SELECTED = 10
GAIN_COLUMNS = ["id", "task", "utility_gain", "alignment", "redundancy"]


def run_report(ctx: StageContext) -> str:
    layout = ctx.layout
    require(layout, "surrogate", ctx.config, force=True, check_config=False)
    inputs = read_inputs(ctx)
    page = render(inputs, plots.available())
    with artifact_dir(layout.report) as out:
        (out / "index.html").write_text(page, encoding="utf-8")
        write_manifest(
            out, build_manifest(layout, "report", ctx.config, content=folder_digest(out))
        )
    return f"report: {layout.report / 'index.html'}"


# ---------------------------------------------------------------- compute: the page


def render(inputs: ReportInputs, have_plots: bool) -> str:
    """The whole HTML document of ``inputs`` (figures only when matplotlib is available)."""
    verdict = sections.verdict(inputs.evaluation, inputs.comparison)
    ranked = sections.ranked_methods(sections.full_fit(inputs.evaluation))
    methods = sorted(ranked, key=lambda m: m != "grasp")  # GRASP first, then by rank
    selections = sorted(
        {r["role"] for r in inputs.curation_results}, key=lambda s: (s != "grasp", s)
    )
    notes = list(inputs.notes)
    if not have_plots:
        notes.append("matplotlib is not installed: no figures (pip install 'grasp-cli[report]').")
    header = sections.header_html(inputs, verdict, notes)
    blocks: list[tuple[str, str, str]] = [
        ("glossary", "Glossary", sections.glossary(methods, selections)),
        ("evaluation", "Held-out evaluation", sections.evaluation_html(inputs, have_plots)),
        ("cost", "Artifact cost", sections.cost_html(inputs, have_plots)),
        ("selection", "Selection", sections.selection_html(inputs, have_plots)),
    ]
    if inputs.curation_results:
        blocks.append(("curation", "Curation check", sections.curation_html(inputs, have_plots)))
    if inputs.loop:
        blocks.append(("loop", "Closed loop", sections.loop_html(inputs.loop)))
    blocks.append(("lcb", "Strictly finite LCB protocol", sections.lcb_html(inputs)))
    blocks.append(("params", "Raw parameters", sections.raw_params_html(inputs.params)))
    blocks = [b for b in blocks if b[2]]
    body = "\n".join(html.section(anchor, title, text) for anchor, title, text in blocks)
    return html.page("grasp report", header, [(anchor, title) for anchor, title, _ in blocks], body)


# ---------------------------------------------------------------- read: the run's tables


def _complete(folder: Path) -> bool:
    manifest = read_manifest(folder)
    return manifest is not None and manifest.complete


def read_inputs(ctx: StageContext) -> ReportInputs:
    """What the page needs from the run; optional artifacts are read only when complete, and
    one made from older inputs or another config is shown with a note saying so."""
    layout = ctx.layout
    inputs = read_surrogate(layout.surrogate)
    inputs.run = str(layout.root)
    inputs.model_kind = ctx.config.model.kind
    inputs.score_reference = ctx.config.score.reference
    if inputs.predictions:
        inputs.designs = subset_designs(layout.subsets)
    present = [a for a in ("scores", "selection", "curation") if _complete(layout.path(a))]
    for artifact in ["surrogate", *present]:
        reason = staleness(layout, artifact, ctx.config)
        if reason:
            inputs.notes.append(f"Stale: {reason} (shown anyway).")

    corpus = read_manifest(layout.corpus)
    domain_of: dict[int, str] = {}
    if corpus is not None and corpus.complete:
        inputs.package_version = corpus.package_version
        inputs.corpus_rows = corpus.extra.get("rows")
        domain_of = corpus_domains(layout.corpus)
        inputs.corpus_domains = dict(Counter(domain_of.values()))
        inputs.text = "tokens" in pq.read_schema(_shards(layout.corpus)[0]).names
    if "scores" in present:
        inputs.top_examples = top_gains(layout.scores / "examples", TOP_EXAMPLES)
    if "selection" in present:
        read_selection(layout.selection, domain_of, inputs)
    shown = [*inputs.selected, *(r for rows in inputs.top_examples.values() for r in rows)]
    found = (
        corpus_details(
            layout.corpus, {r["id"] for r in shown}, inputs.text, _byte_level(corpus.extra)
        )
        if shown and domain_of
        else {}
    )
    for row in shown:
        row.setdefault("domain", domain_of.get(row["id"], "?"))
        row.update(found.get(row["id"], {"doc": None, "snippet": None}))

    if "curation" in present:
        from grasp_cli.artifacts.results import read_results

        inputs.curation_results = read_results(layout.curation).to_pylist()
    inputs.loop = loop_rows(layout)
    return inputs


def read_surrogate(folder: Path) -> ReportInputs:
    """The surrogate's tables (evaluation, LCB, params; comparison, by-design and eval-subset
    predictions when present) as a ``ReportInputs`` with nothing else filled in."""
    lcb = read_table(folder / "lcb.parquet")
    inputs = ReportInputs(
        run=str(folder.parent),
        evaluation=read_table(folder / "evaluation.parquet").to_pylist(),
        lcb=lcb.to_pylist(),
        lcb_columns=[c for c in lcb.column_names if c != "values"],
        params=json.loads((folder / "params.json").read_text(encoding="utf-8")),
    )
    optional = {"comparison": "comparison", "evaluation_by_design": "by_design"}
    for name, target in optional.items():
        if (folder / f"{name}.parquet").is_file():
            setattr(inputs, target, read_table(folder / f"{name}.parquet").to_pylist())
    if (folder / "predictions.parquet").is_file():
        predictions = read_table(folder / "predictions.parquet").to_pylist()
        inputs.predictions = [r for r in predictions if r["role"] == "eval"]
    return inputs


def read_selection(folder: Path, domain_of: dict[int, str], inputs: ReportInputs) -> None:
    """The selection's domain counts and first rows, every other curation selection's domain
    counts (``domain_of``: corpus id -> domain), and the curation selections skipped."""
    selected = read_table(folder / "selected.parquet")
    inputs.selection_domains["selection"] = dict(Counter(selected.column("domain").to_pylist()))
    inputs.selected = sorted(selected.to_pylist(), key=lambda r: r["rank"])[:TOP_SELECTED]
    if (folder / "curation.parquet").is_file() and domain_of:
        for name, ids in _ids_by_selection(read_table(folder / "curation.parquet")).items():
            if name not in ("grasp", "whole"):
                inputs.selection_domains[name] = dict(Counter(domain_of.get(i, "?") for i in ids))
    extra = read_manifest(folder).extra
    inputs.repeats = extra.get("repeats") or {}
    skipped = extra.get("curation_skipped") or {}
    for name, why in skipped.items():
        inputs.notes.append(f"Curation selection {name} skipped: {why}")


def _shards(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("part-*.parquet"))


def _byte_level(extra: dict) -> bool:
    """Whether the corpus holds grasp's byte tokens (pad 256) rather than a tokenizer's ids."""
    return int(extra.get("pad_id", BYTE_PAD_ID)) == BYTE_PAD_ID and not extra.get("tokenizer")


def _ids_by_selection(table) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for name, id_ in zip(
        table.column("selection").to_pylist(), table.column("id").to_pylist(), strict=True
    ):
        out.setdefault(name, []).append(id_)
    return out


def subset_designs(path: Path) -> dict[int, str]:
    """subset_id -> design, from ``subsets.zarr`` (empty when it is absent)."""
    if not Path(path).is_dir():
        return {}
    from grasp_cli.artifacts.zarr_io import open_group_read

    group = open_group_read(path, "retrain-subsets")
    return {i: str(d) for i, d in enumerate(group["design"][:])}


def corpus_domains(folder: Path) -> dict[int, str]:
    """id -> domain of every corpus row (two small columns, never the tokens)."""
    out: dict[int, str] = {}
    for path in _shards(folder):
        table = pq.read_table(path, columns=["id", "domain"])
        out.update(
            zip(table.column("id").to_pylist(), table.column("domain").to_pylist(), strict=True)
        )
    return out


def corpus_details(folder: Path, ids: set[int], text: bool, byte_level: bool) -> dict[int, dict]:
    """id -> {doc, snippet} for ``ids`` only (row groups filtered by id; tokens read only for a
    text corpus). ``snippet``: the row's first characters for grasp's byte corpus, the first
    token ids for a tokenizer's corpus, None for images."""
    out: dict[int, dict] = {}
    wanted = sorted(ids)
    for path in _shards(folder):
        names = pq.read_schema(path).names
        columns = ["id", *(c for c in ("doc", "tokens") if c in names and (text or c != "tokens"))]
        table = pq.read_table(path, columns=columns, filters=[("id", "in", wanted)])
        for row in table.to_pylist():
            tokens = row.get("tokens")
            snippet = None
            if tokens is not None:
                snippet = (
                    sections.byte_snippet(tokens)
                    if byte_level
                    else "token ids " + " ".join(map(str, tokens[:24])) + " …"
                )
            out[row["id"]] = {"doc": row.get("doc"), "snippet": snippet}
    return out


def top_gains(folder: Path, n: int) -> dict[str, list[dict]]:
    """task -> the ``n`` examples with the largest utility_gain, streamed part by part (only
    each part's top ``n`` per task is kept)."""
    candidates: list[dict] = []
    for path in _shards(folder):
        table = pq.read_table(path, columns=GAIN_COLUMNS)
        tasks = np.array(table.column("task").to_pylist())
        gain = table.column("utility_gain").to_numpy()
        for task in np.unique(tasks):
            rows = np.flatnonzero(tasks == task)
            best = rows[np.argsort(-np.nan_to_num(gain[rows], nan=-np.inf), kind="stable")[:n]]
            candidates += table.take(best).to_pylist()
    return sections.top_by_task(candidates, n)


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
