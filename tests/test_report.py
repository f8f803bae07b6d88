"""`grasp report`: one self-contained HTML page a data scientist can act on.

One module-scoped tiny run (the real CLI, tests/tiny.toml) through the curation check and
the report; the tests read the page back and check it against the run's own tables: the
verdict names the method the evaluation table ranks first, every method is in the glossary,
the top examples show the text of real corpus rows, figures are embedded PNGs that decode,
and headless Chromium renders the page with every image loaded.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from grasp_cli.report import sections
from tests.conftest import TINY, build_run, copy_run, grasp_ok

STAGES = [
    ["prepare"],
    ["sketch"],
    ["retrain-subsets"],
    ["fit-surrogate"],
    ["score"],
    ["select"],
    ["retrain-subsets", "--curation"],
    ["report"],
]
FIGURES = {
    "method comparison",
    "predicted vs measured",
    "cost curve",
    "domain composition",
    "curation differences",
}
IMG = re.compile(r'<img src="([^"]*)" alt="([^"]*)">')
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRASP_PROGRESS", "0")
        mp.delenv("GRASP_DEBUG", raising=False)
        for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"):
            mp.delenv(name, raising=False)
        return build_run(tmp_path_factory.mktemp("report") / "run", STAGES)


@pytest.fixture(scope="module")
def page(run) -> str:
    return (run / "report" / "index.html").read_text(encoding="utf-8")


def table_rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def section_of(page: str, anchor: str) -> str:
    match = re.search(rf'<section id="{anchor}">(.*?)</section>', page, re.S)
    assert match, f"no section {anchor}"
    return match.group(1)


def mean_rows_at_full_fit(evaluation: list[dict]) -> dict[str, dict]:
    """method -> its 'mean' row at its largest n_fit (computed here, not by the report)."""
    out: dict[str, dict] = {}
    for r in evaluation:
        if r["task"] == "mean" and r["n_fit"] >= out.get(r["method"], {"n_fit": -1})["n_fit"]:
            out[r["method"]] = r
    return out


# ---------------------------------------------------------------- one file, embedded figures


def test_report_is_one_self_contained_file(run, page):
    files = sorted(p.name for p in (run / "report").iterdir() if p.name != "_grasp")
    assert files == ["index.html"]
    sources = re.findall(r'\b(?:src|href)="([^"#]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources), [
        s[:40] for s in sources if not s.startswith("data:")
    ]
    assert not re.search(r"https?://|<script|<link|@import", page)


def test_every_figure_is_an_embedded_png_that_decodes(page):
    images = IMG.findall(page)
    assert {alt for _, alt in images} == FIGURES
    for src, alt in images:
        data = base64.b64decode(src.removeprefix("data:image/png;base64,"), validate=True)
        assert data.startswith(PNG_MAGIC), alt
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.asarray(image.convert("L"), dtype=float)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels.var() > 0, alt


# ---------------------------------------------------------------- verdict and glossary


def test_verdict_names_the_winner_of_the_evaluation_table(run, page):
    means = mean_rows_at_full_fit(table_rows(run / "surrogate" / "evaluation.parquet"))
    best = max(r["spearman"] for r in means.values())
    winners = sorted(m for m in means if means[m]["spearman"] == best)
    line = re.search(r'<p class="verdict[^"]*" id="verdict">(.*?)</p>', page, re.S).group(1)
    names = " and ".join(f"<b>{m}</b>" for m in winners)
    assert f"{names} {'ranks' if len(winners) == 1 else 'tie for'} first" in line
    assert f"ρ = {best:.3f}" in line
    # GRASP against the best other method, with the paired interval of comparison.parquet
    rival = max(
        (m for m in means if m not in ("grasp", "constant")), key=lambda m: means[m]["spearman"]
    )
    (row,) = [
        r
        for r in table_rows(run / "surrogate" / "comparison.parquet")
        if r["suite"] == "all" and r["baseline"] == rival
    ]
    assert f"best other method, {rival}" in line
    assert f"{row['difference']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]" in line
    expected = (
        "beyond noise: GRASP better"
        if row["ci_low"] > 0
        else "beyond noise: GRASP worse"
        if row["ci_high"] < 0
        else "within noise"
    )
    assert f"<b>{expected}</b>" in line
    # the verdict and the glossary come before the held-out table
    assert page.index('id="verdict"') < page.index('id="glossary"') < page.index('id="evaluation"')


def _mean_row(method: str, rho: float, n_fit: int = 40) -> dict:
    return {"method": method, "task": "mean", "n_fit": n_fit, "spearman": rho,
            "ci_low": rho - 0.1, "ci_high": rho + 0.1, "pearson": rho, "n_eval": 20}  # fmt: skip


def _paired(baseline: str, difference: float, low: float, high: float) -> list[dict]:
    return [{"suite": "all", "method": "grasp", "baseline": baseline, "difference": difference,
             "ci_low": low, "ci_high": high, "n_eval": 20, "best": True}]  # fmt: skip


@pytest.mark.parametrize(
    ("rows", "comparison", "winners", "outcome", "phrase"),
    [
        # GRASP first and the paired interval excludes 0
        ([_mean_row("grasp", 0.8), _mean_row("trak", 0.5), _mean_row("constant", 0.0)],
         _paired("trak", 0.3, 0.1, 0.5), ["grasp"], "win", "beyond noise: GRASP better"),
        # a baseline first: the verdict names it, never GRASP
        ([_mean_row("grasp", 0.4), _mean_row("regmix", 0.7)],
         _paired("regmix", -0.3, -0.5, -0.1), ["regmix"], "lose", "beyond noise: GRASP worse"),
        # GRASP's cost-curve refit (smaller n_fit) does not count as its result
        ([_mean_row("grasp", 0.5), _mean_row("grasp", 0.9, n_fit=8), _mean_row("datamodels", 0.55)],
         _paired("datamodels", -0.05, -0.3, 0.2), ["datamodels"], "tie", "within noise"),
        # an exact tie names both methods, GRASP not singled out
        ([_mean_row("grasp", 0.7), _mean_row("additive", 0.7), _mean_row("cosine", 0.1)],
         _paired("additive", 0.0, -0.1, 0.1), ["additive", "grasp"], "tie",
         "<b>additive</b> and <b>grasp</b> tie for first"),
        # no comparison.parquet: the verdict says the noise question is open
        ([_mean_row("grasp", 0.6), _mean_row("cosine", 0.2)], [],
         ["grasp"], "unknown", "not known"),
    ],
)  # fmt: skip
def test_verdict_reads_the_paired_interval(rows, comparison, winners, outcome, phrase):
    v = sections.verdict(rows, comparison)
    assert (v.winners, v.outcome) == (winners, outcome)
    assert f"<b>{winners[0]}</b>" in v.html and phrase in v.html


def test_glossary_defines_every_method_and_selection(run, page):
    glossary = section_of(page, "glossary")
    methods = {r["method"] for r in table_rows(run / "surrogate" / "evaluation.parquet")}
    selections = {
        r["role"]
        for p in sorted((run / "curation").glob("part-*.parquet"))
        for r in pq.read_table(p, columns=["role"]).to_pylist()
    }
    for name in methods | selections:
        assert f"<dt>{name}</dt><dd>" in glossary, name
    assert "(no description in this report)" not in glossary
    for unit in ("utility", "Spearman ρ", "noise ceiling", "utility_gain"):
        assert f"<dt>{unit}</dt>" in glossary


# ---------------------------------------------------------------- selection and curation


def test_top_examples_show_the_text_of_real_corpus_rows(run, page):
    gains = pa.concat_tables(
        [pq.read_table(p) for p in sorted((run / "scores" / "examples").glob("part-*.parquet"))]
    ).to_pylist()
    corpus = pa.concat_tables(
        [pq.read_table(p) for p in sorted((run / "corpus").glob("part-*.parquet"))]
    ).to_pylist()
    by_id = {r["id"]: r for r in corpus}
    selection = section_of(page, "selection")
    for task in sorted({g["task"] for g in gains}):
        best = max((g for g in gains if g["task"] == task), key=lambda g: g["utility_gain"])
        block = selection.split(f"<h4>{task}</h4>", 1)[1].split("</table>", 1)[0]
        first = re.search(r"<tbody><tr>(.*?)</tr>", block).group(1)
        row = by_id[best["id"]]
        assert first.startswith(f"<td>1</td><td>{best['id']}</td><td>{row['domain']}</td>")
        text = bytes(t for t in row["tokens"] if t < 256).decode("utf-8", errors="replace")
        piece = max(re.split(r"[\r\n\t]", text[:160]), key=len).strip()[:24]  # no line break
        assert len(piece) >= 4 and html.escape(piece) in first, (piece, first)
        assert html.escape(row["doc"]) in first


def test_domain_composition_compares_the_selection_with_the_corpus(run, page):
    selected = table_rows(run / "selection" / "selected.parquet")
    corpus = pa.concat_tables(
        [pq.read_table(p, columns=["domain"]) for p in sorted((run / "corpus").glob("part-*"))]
    ).column("domain")
    selection = section_of(page, "selection")
    for name, domains in (
        ("corpus", corpus.to_pylist()),
        ("selection", [r["domain"] for r in selected]),
    ):
        row = re.search(rf"<tr><td>{name}</td>(.*?)</tr>", selection).group(1)
        assert f"<td>{len(domains)}</td>" in row
        for domain in sorted(set(domains)):
            count = domains.count(domain)
            assert f"<td>{count / len(domains):.2f} ({count})</td>" in row, (name, domain)


def test_curation_verdict_names_the_strongest_other_selection(run, page):
    rows = [
        r
        for p in sorted((run / "curation").glob("part-*.parquet"))
        for r in pq.read_table(p).to_pylist()
        if r["metric"] == "loss"
    ]
    per_selection: dict[str, list[float]] = {}
    for r in rows:
        per_selection.setdefault(r["role"], []).append(r["value"])
    others = {n: float(np.mean(v)) for n, v in per_selection.items() if n not in ("grasp", "whole")}
    strongest = min(others, key=others.get)
    line = re.search(r'id="curation-verdict">(.*?)</p>', page, re.S).group(1)
    assert f"best other selection, <b>{strongest}</b>" in line
    assert "GRASP − each other selection" in section_of(page, "curation")


# ---------------------------------------------------------------- collapsed blocks


def test_lcb_table_and_raw_json_are_collapsed_at_the_end(run, page):
    blocks = re.findall(r"<details>(.*?)</details>", page, re.S)
    assert len(blocks) == 2
    lcb, raw = blocks
    assert "<th>lcb</th>" in lcb and "<th>chosen</th>" in lcb
    assert page.count("<th>lcb</th>") == 1  # the LCB table only inside <details>
    params = json.loads((run / "surrogate" / "params.json").read_text())
    shown = json.loads(html.unescape(re.search(r"<pre>(.*?)</pre>", raw, re.S).group(1)))
    expected = {k: v for k, v in params.items() if k != "tasks"}
    assert json.dumps(shown, sort_keys=True) == json.dumps(expected, sort_keys=True)  # NaN-safe
    assert page.rindex("<details>") > page.rindex("<img")  # raw JSON is the last thing


# ---------------------------------------------------------------- partial runs


@pytest.mark.parametrize(
    "names",
    [("surrogate",), ("corpus", "tasks", "subsets.zarr", "retrain", "surrogate")],
    ids=["surrogate-only", "no-scores-selection-curation"],
)
def test_a_run_with_only_the_surrogate_gets_a_report(run, tmp_path, names):
    partial = copy_run(run, tmp_path / "partial", names)
    grasp_ok("report", "-c", TINY, "--run", partial)
    page = (partial / "report" / "index.html").read_text(encoding="utf-8")
    assert re.search(r'id="verdict"><b>Verdict:</b> <b>[\w-]+</b> ranks first', page)
    assert {alt for _, alt in IMG.findall(page)} == {
        "method comparison",
        "predicted vs measured",
        "cost curve",
    }
    assert 'id="selection"' not in page and 'id="curation"' not in page
    assert len(re.findall(r"<details>", page)) == 2


# ---------------------------------------------------------------- headless Chromium


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def _browse(tmp_path: Path, page_path: Path, *flags: str) -> subprocess.CompletedProcess:
    binary = chromium()
    if binary is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium) to render the report")
    command = [binary, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}", *flags, page_path.as_uri()]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=90)


CHECK_IMAGES = (
    "<script>window.addEventListener('load', () => { document.title = [...document.images]"
    ".every(i => i.complete && i.naturalWidth > 0) ? 'ALL-IMAGES-OK' : 'BROKEN'; });</script>"
)


def test_chromium_renders_every_figure(run, page, tmp_path):
    checked = tmp_path / "checked.html"  # a copy: the report itself has no script
    checked.write_text(page.replace("</body>", CHECK_IMAGES + "</body>"), encoding="utf-8")
    done = _browse(tmp_path, checked, "--virtual-time-budget=5000", "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "<title>ALL-IMAGES-OK</title>" in done.stdout
    assert {alt for _, alt in IMG.findall(done.stdout)} == FIGURES

    # the check can fail: one undecodable image turns the title to BROKEN
    broken = tmp_path / "broken.html"
    broken.write_text(
        checked.read_text().replace("</body>", '<img src="data:image/png;base64,AAAA"></body>')
    )
    done = _browse(tmp_path, broken, "--virtual-time-budget=5000", "--dump-dom")
    assert done.returncode == 0 and "<title>BROKEN</title>" in done.stdout

    shot = tmp_path / "shot.png"
    done = _browse(
        tmp_path, run / "report" / "index.html", f"--screenshot={shot}", "--window-size=1200,4000"
    )
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.shape == (4000, 1200) and pixels.var() > 0
