"""End to end through the real CLI on the tiny recipe (tests/tiny.toml).

One module-scoped run builds every artifact once; the tests check the documented
schemas, that sharded and resumed runs reproduce the one-shot run exactly, that
``--dry-run`` writes nothing, and that ``select --export`` round-trips.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from grasp_cli.artifacts.examples import read_examples, read_tasks
from grasp_cli.artifacts.manifest import read_manifest
from grasp_cli.artifacts.results import RESULT_SCHEMA
from tests.conftest import copy_run, result_rows
from tests.conftest import grasp_ok as ok
from tests.conftest import run_grasp as grasp

CONFIG = Path(__file__).with_name("tiny.toml")
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
N_SUBSETS = 16  # tiny.toml: mixture 12 + within 4
N_JOBS = N_SUBSETS + 3  # + repeat_subsets 3 with one extra seed
K = 32


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
    }


@pytest.fixture(scope="module")
def env():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRASP_PROGRESS", "0")
        mp.delenv("GRASP_DEBUG", raising=False)
        for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"):
            mp.delenv(name, raising=False)
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory, env) -> Path:
    """The whole pipeline once, into one run directory."""
    root = tmp_path_factory.mktemp("pipeline") / "run"
    for stage in STAGES:
        ok(*stage, "-c", CONFIG, "--run", root)
    return root


# ---------------------------------------------------------------- schemas


def test_corpus_and_tasks_have_the_documented_schema(run):
    corpus_parts = sorted((run / "corpus").glob("part-*.parquet"))
    assert len(corpus_parts) >= 2  # shard_rows = 40 < N: the corpus is really sharded
    for path in [*corpus_parts, *sorted((run / "tasks").glob("*.parquet"))]:
        schema = pq.read_schema(path)
        assert schema.field("id").type == pa.int64()
        assert schema.field("domain").type == pa.string()
        assert schema.field("tokens").type == pa.list_(pa.int32())
    corpus = read_examples(run / "corpus")
    assert len(corpus) == 96  # 4 domains x max_seqs_per_domain 24
    assert set(corpus.domains.tolist()) == {"docs", "json", "email", "http"}
    assert corpus.fields["tokens"].shape == (96, 33)  # seq_len + 1
    assert sorted(read_tasks(run / "tasks")) == ["docs", "email"]


def test_sketches_have_the_documented_layout(run):
    group = zarr.open_group(str(run / "sketches.zarr"), mode="r")
    corpus = read_examples(run / "corpus")
    train = np.asarray(group["train"][:])
    assert train.shape == (len(corpus), K) and train.dtype == np.float32
    assert np.isfinite(train).all()
    # every row chunk was written (the fill value is 0, a real sketch row is not)
    assert (np.abs(train).sum(axis=1) > 0).all()
    assert np.array_equal(np.asarray(group["train_ids"][:]), corpus.ids)
    tasks = np.asarray(group["tasks"][:])
    names = [str(n) for n in group["task_names"][:]]
    assert names == ["docs", "email"]
    assert (
        tasks.shape == (2, K) and np.isfinite(tasks).all() and (np.abs(tasks).sum(axis=1) > 0).all()
    )


def test_subsets_membership_is_bit_packed(run):
    group = zarr.open_group(str(run / "subsets.zarr"), mode="r")
    membership = np.asarray(group["membership"][:])
    n = len(read_examples(run / "corpus"))
    assert membership.dtype == np.uint8 and membership.shape == (N_SUBSETS, math.ceil(n / 8))
    sizes = np.asarray(group["size"][:])
    bits = np.unpackbits(membership, axis=1, count=n)
    assert np.array_equal(bits.sum(axis=1), sizes)
    assert (sizes > 0).all()
    roles = {str(r) for r in group["role"][:]}
    assert roles == {"fit", "eval"}


def test_retrain_results_have_one_row_per_run_task_and_metric(run):
    parts = sorted((run / "retrain").glob("part-*.parquet"))
    assert len(parts) == N_JOBS
    for path in parts:
        assert pq.read_schema(path).names == RESULT_SCHEMA.names
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    keys = list(
        zip(
            *(table.column(c).to_pylist() for c in ("subset_id", "seed", "task", "metric")),
            strict=True,
        )
    )
    assert len(keys) == len(set(keys))
    assert set(table.column("steps").to_pylist()) == {8}
    assert np.isfinite(table.column("value").to_numpy()).all()
    # utility is the measurement on the surrogate's scale: −loss (higher is better)
    is_loss = np.array(table.column("metric").to_pylist()) == "loss"
    np.testing.assert_array_equal(
        table.column("utility").to_numpy()[is_loss], -table.column("value").to_numpy()[is_loss]
    )
    loss = [(s, seed, t) for s, seed, t, m in keys if m == "loss"]
    seeds = sorted({seed for _, seed, _ in loss})
    assert len(seeds) == 2
    base = {(s, t) for s, seed, t in loss if seed == seeds[0]}
    assert base == {(s, t) for s in range(N_SUBSETS) for t in ("docs", "email")}
    assert len({s for s, seed, _ in loss if seed == seeds[1]}) == 3  # repeat_subsets


def test_surrogate_tables(run):
    folder = run / "surrogate"
    params = json.loads((folder / "params.json").read_text())
    assert params["task_names"] == ["docs", "email"]
    assert params["excluded_subsets"] == []
    n_fit, n_eval = params["n_fit"], params["n_eval"]
    assert n_fit + n_eval == N_SUBSETS and n_fit >= 4 and n_eval >= 3

    lcb = pq.read_table(folder / "lcb.parquet").to_pylist()
    methods = {r["method"] for r in lcb}
    assert "grasp" in methods
    for method in methods:
        full = [r for r in lcb if r["method"] == method and r["n_fit"] == n_fit]
        chosen = [r for r in full if r["chosen"]]
        assert len(chosen) == 1, method
        finite = [r["lcb"] for r in full if r["lcb"] is not None and np.isfinite(r["lcb"])]
        if finite:  # the protocol picks the highest lower confidence bound
            assert chosen[0]["lcb"] == pytest.approx(max(finite))
    grasp_candidates = [r for r in lcb if r["method"] == "grasp" and r["n_fit"] == n_fit]
    assert (
        len(grasp_candidates) == 2 * 2 * 2 * 2
    )  # k_grid x alignment_grid x geometry_grid x ridge_grid
    chosen = next(r for r in grasp_candidates if r["chosen"])
    model = params["grasp"]  # the model refit on all fit subsets is the chosen candidate
    assert (model["k"], model["geometry"], float(model["ridge"]), model["n_fit"]) == (
        chosen["k"], chosen["geometry"], float(chosen["ridge"]), n_fit,
    )  # fmt: skip

    evaluation = pq.read_table(folder / "evaluation.parquet")
    assert set(
        ["method", "task", "n_fit", "spearman", "ci_low", "ci_high", "pearson", "n_eval"]
    ) <= set(evaluation.column_names)
    rows = evaluation.to_pylist()
    assert {r["method"] for r in rows} == methods
    for method in methods:
        full = [r for r in rows if r["method"] == method and r["n_fit"] == n_fit]
        mean = [r for r in full if r["task"] == "mean"]
        assert len(mean) == 1, method
        per_task = [r["spearman"] for r in full if r["task"] != "mean"]
        assert len(per_task) == 2
        assert mean[0]["spearman"] == pytest.approx(np.mean(per_task), nan_ok=True)
        assert all(r["n_eval"] == n_eval for r in full)
        for r in full:
            if np.isfinite(r["ci_low"]) and np.isfinite(r["ci_high"]):
                assert r["ci_low"] <= r["ci_high"] + 1e-12


def test_scores_split_gain_into_alignment_and_redundancy(run):
    subsets = pq.read_table(run / "scores" / "subsets.parquet")
    assert subsets.column_names == [
        "subset_id",
        "role",
        "size",
        "task",
        "predicted_utility",
        "alignment",
        "redundancy",
    ]
    assert subsets.num_rows == N_SUBSETS * 2
    sizes = np.asarray(zarr.open_group(str(run / "subsets.zarr"), mode="r")["size"][:])
    by_id = dict(
        zip(
            subsets.column("subset_id").to_pylist(), subsets.column("size").to_pylist(), strict=True
        )
    )
    assert [by_id[i] for i in range(N_SUBSETS)] == sizes.tolist()

    parts = sorted((run / "scores" / "examples").glob("part-*.parquet"))
    assert len(parts) == 3  # score.chunk_rows = 40 over 96 rows
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    assert table.column_names == ["id", "task", "utility_gain", "alignment", "redundancy"]
    gain, alignment, redundancy = (
        table.column(c).to_numpy() for c in ("utility_gain", "alignment", "redundancy")
    )
    assert np.isfinite(gain).all()
    # one sign convention in both tables: value = alignment − redundancy (+ intercept)
    np.testing.assert_allclose(gain, alignment - redundancy, rtol=1e-9, atol=1e-12)
    corpus = read_examples(run / "corpus")
    pairs = list(zip(table.column("id").to_pylist(), table.column("task").to_pylist(), strict=True))
    assert len(pairs) == len(set(pairs)) == 2 * len(corpus)
    assert {i for i, _ in pairs} == set(corpus.ids.tolist())


def test_selection_has_budget_many_unique_corpus_ids(run):
    table = pq.read_table(run / "selection" / "selected.parquet")
    assert table.schema.names[:4] == ["id", "rank", "objective_gain", "domain"]
    assert (
        table.schema.field("id").type == pa.int64()
        and table.schema.field("rank").type == pa.int64()
    )
    corpus = read_examples(run / "corpus")
    budget = round(0.25 * len(corpus))
    ids = table.column("id").to_pylist()
    assert len(ids) == budget == len(set(ids))
    assert table.column("rank").to_pylist() == list(range(1, budget + 1))
    domain_of = dict(zip(corpus.ids.tolist(), corpus.domains.tolist(), strict=True))
    assert set(ids) <= set(domain_of)
    assert table.column("domain").to_pylist() == [domain_of[i] for i in ids]


def test_report_mentions_every_method(run):
    page = (run / "report" / "index.html").read_text()
    methods = set(
        pq.read_table(run / "surrogate" / "evaluation.parquet").column("method").to_pylist()
    )
    assert len(methods) >= 3
    for method in methods:
        assert method in page, method
    assert "Curation check" in page  # retrain-subsets --curation ran before the report


def test_status_says_ok_for_every_artifact(run):
    out = ok("status", "-c", CONFIG, "--run", run)
    lines = [line for line in out.splitlines()[1:] if line.strip()]
    names = {line.split()[0] for line in lines}
    assert names == {
        "corpus", "tasks", "reference", "sketches", "subsets", "retrain",
        "surrogate", "scores", "selection", "curation", "report",
    }  # fmt: skip
    for line in lines:
        assert line.split()[1] == "ok", line


def test_status_reports_a_changed_config_as_stale(run):
    out = ok("status", "-c", CONFIG, "--run", run, "--set", "sketch.kron_dim=2")
    sketches = next(line for line in out.splitlines() if line.strip().startswith("sketches"))
    assert "STALE" in sketches and "kron_dim" in sketches


# ---------------------------------------------------------------- dry runs


@pytest.mark.parametrize("stage", [s for s in STAGES], ids=lambda s: "-".join(s))
def test_dry_run_exits_zero_and_writes_nothing(run, tmp_path, stage):
    before = snapshot(run)
    out = ok(*stage, "-c", CONFIG, "--run", run, "--dry-run")
    assert "# writes:" in out and "[sketch]" in out  # the resolved config and the artifacts
    assert snapshot(run) == before
    fresh = tmp_path / "fresh"
    ok(*stage, "-c", CONFIG, "--run", fresh, "--dry-run")
    assert not fresh.exists()


# ---------------------------------------------------------------- sharding and resumption


def test_three_shard_sketch_is_bit_identical(run, tmp_path):
    other = copy_run(run, tmp_path / "run", ("corpus", "tasks", "reference"))
    for index in range(3):
        out = ok("sketch", "-c", CONFIG, "--run", other, "--shard", index, "--num-shards", 3, "-q")
        complete = read_manifest(other / "sketches.zarr").complete
        assert complete == (index == 2), out
    one = zarr.open_group(str(run / "sketches.zarr"), mode="r")
    three = zarr.open_group(str(other / "sketches.zarr"), mode="r")
    for name in ("train", "train_ids", "tasks"):
        a, b = np.asarray(one[name][:]), np.asarray(three[name][:])
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes(), name
    assert [str(x) for x in one["task_names"][:]] == [str(x) for x in three["task_names"][:]]
    # the same inputs and config give the same fingerprint, so downstream artifacts stay fresh
    assert (
        read_manifest(run / "sketches.zarr").fingerprint
        == read_manifest(other / "sketches.zarr").fingerprint
    )


def test_two_shard_retrain_equals_the_unsharded_run(run, tmp_path):
    other = copy_run(run, tmp_path / "run", ("corpus", "tasks", "reference"))
    trained = []
    for index in range(2):
        out = ok(
            "retrain-subsets",
            "-c",
            CONFIG,
            "--run",
            other,
            "--shard",
            index,
            "--num-shards",
            2,
            "-q",
        )
        trained.append(int(re.search(r"trained (\d+) runs", out).group(1)))
    assert sum(trained) == N_JOBS and min(trained) > 0
    assert read_manifest(other / "retrain").complete
    one = zarr.open_group(str(run / "subsets.zarr"), mode="r")
    two = zarr.open_group(str(other / "subsets.zarr"), mode="r")
    assert np.array_equal(np.asarray(one["membership"][:]), np.asarray(two["membership"][:]))
    assert result_rows(other / "retrain") == result_rows(run / "retrain")


def test_limit_then_resume_trains_each_run_once(run, tmp_path):
    other = copy_run(run, tmp_path / "run", ("corpus", "tasks", "reference"))
    out = ok("retrain-subsets", "-c", CONFIG, "--run", other, "--limit", 2, "-q")
    assert "trained 2 runs" in out
    assert len(list((other / "retrain").glob("part-*.parquet"))) == 2
    assert len(list((other / "retrain" / "_grasp" / "done").glob("*.json"))) == 2
    assert not read_manifest(other / "retrain").complete
    status = ok("status", "-c", CONFIG, "--run", other)
    assert f"incomplete: {N_JOBS - 2}/{N_JOBS} units missing" in status
    code, _, err = grasp("fit-surrogate", "-c", CONFIG, "--run", other)
    assert code == 2 and "incomplete" in err  # a half-finished input is refused
    out = ok("retrain-subsets", "-c", CONFIG, "--run", other, "-q")
    assert f"trained {N_JOBS - 2} runs" in out
    assert read_manifest(other / "retrain").complete
    rows = result_rows(other / "retrain")
    keys = [(r[0], r[5], r[2], r[3]) for r in rows]  # subset_id, seed, task, metric
    assert len(keys) == len(set(keys))
    assert rows == result_rows(run / "retrain")
    out = ok("retrain-subsets", "-c", CONFIG, "--run", other, "-q")  # nothing left to do
    assert "trained 0 runs" in out
    assert len(list((other / "retrain").glob("part-*.parquet"))) == N_JOBS


def test_limit_keeps_subset_designs_in_proportion(run, tmp_path):
    """tiny.toml samples 12 mixture and 4 within subsets: 4 limited runs hold both designs
    (3 mixture, 1 within), where unit order would train mixture subsets only."""
    other = copy_run(run, tmp_path / "run", ("corpus", "tasks", "reference"))
    ok("retrain-subsets", "-c", CONFIG, "--run", other, "--limit", 4, "-q")
    trained = {r[0] for r in result_rows(other / "retrain")}
    design = zarr.open_group(str(other / "subsets.zarr"), mode="r")["design"][:]
    counts = {d: sum(str(design[s]) == d for s in trained) for d in ("mixture", "within")}
    assert counts == {"mixture": 3, "within": 1}


def test_select_export_round_trips(run, tmp_path):
    export = tmp_path / "export"
    ok("select", "-c", CONFIG, "--run", run, "--export", export, "-q")
    selected = pq.read_table(run / "selection" / "selected.parquet").column("id").to_numpy()
    exported = read_examples(export)
    corpus = read_examples(run / "corpus")
    rows = np.flatnonzero(np.isin(corpus.ids, selected))
    expected = corpus.take(rows)
    assert len(exported) == len(selected)
    assert np.array_equal(exported.ids, expected.ids)
    assert exported.domains.tolist() == expected.domains.tolist()
    assert exported.docs.tolist() == expected.docs.tolist()
    assert np.array_equal(exported.fields["tokens"], expected.fields["tokens"])


# ---------------------------------------------------------------- safety of what the run wrote


def test_artifacts_hold_no_pickles(run):
    state = torch.load(run / "reference" / "model.pt", map_location="cpu", weights_only=True)
    assert (
        isinstance(state, dict)
        and state
        and all(isinstance(v, torch.Tensor) for v in state.values())
    )
    for path in run.rglob("*.npz"):
        with np.load(path, allow_pickle=False) as handle:
            for name in handle.files:
                assert handle[name].dtype != object, (path, name)
    for path in run.rglob("*"):
        if path.is_file() and path.suffix in (".pkl", ".pickle", ".joblib"):
            pytest.fail(f"pickle file in the run: {path}")


def test_stages_that_need_ids_and_domains_never_read_token_rows(run, tmp_path, monkeypatch):
    """fit-surrogate, score and select (its curation check aside) read corpus columns only;
    retrain-subsets reads rows through the row store, never by decoding row groups in its own
    process."""
    import grasp_cli.artifacts.examples as examples

    names = ("corpus", "tasks", "reference", "sketches.zarr", "subsets.zarr", "retrain")
    other = copy_run(run, tmp_path / "other", names)
    decoded: list[str] = []
    original = examples._table_to_examples

    def watched(table, path, first_row=0):
        if Path(path).parent.name == "corpus":  # task files are small and read whole
            decoded.append(str(path))
        return original(table, path, first_row)

    monkeypatch.setattr(examples, "_table_to_examples", watched)
    # (select's curation check reads rows by design: DSIR's n-grams, the repeats table)
    for stage in (["fit-surrogate"], ["score"], ["select", "--set", "select.curation=false"]):
        ok(*stage, "-c", CONFIG, "--run", other, "-q")
    assert decoded == []
    # the row store is built once (one pass over the rows), then training reads only batches
    ok("retrain-subsets", "-c", CONFIG, "--run", other, "-q", "--force", "--limit", "2")
    corpus_rows = read_manifest(other / "corpus").extra["rows"]
    groups = sum(
        pq.read_metadata(p).num_row_groups for p in (other / "corpus").glob("part-*.parquet")
    )
    assert len(decoded) == groups and corpus_rows > 0
    decoded.clear()
    ok("retrain-subsets", "-c", CONFIG, "--run", other, "-q", "--force", "--limit", "2")
    assert decoded == []  # the row store is reused


def test_progress_in_a_job_log_is_one_timestamped_line_per_step(run, tmp_path):
    """With stderr not a terminal (a SLURM log), prepare and fit-surrogate write progress as
    timestamped lines, never tqdm's carriage-return updates."""
    import os
    import subprocess
    import sys

    other = copy_run(
        run, tmp_path / "other", ("corpus", "tasks", "sketches.zarr", "subsets.zarr", "retrain")
    )
    env = {**os.environ, "GRASP_PROGRESS": "1"}
    command = [sys.executable, "-c", "from grasp_cli.cli import entry; entry()"]
    logs = {}
    for stage in ("fit-surrogate", "prepare"):  # prepare last: --force rebuilds the corpus
        done = subprocess.run(
            [*command, stage, "-c", CONFIG, "--run", other, "--force"],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        logs[stage] = done.stderr
    for stage, text in logs.items():
        assert "\r" not in text
        lines = [line for line in text.splitlines() if f"grasp {stage}" in line]
        assert lines, (stage, text[-1000:])
        assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d grasp ", line) for line in lines)
    steps = [line for line in logs["fit-surrogate"].splitlines() if "steps" in line]
    assert "methods fitted by the LCB protocol" in steps[0]
    assert re.search(r"(\d+)/\1 steps", steps[-1])  # the last step is logged
