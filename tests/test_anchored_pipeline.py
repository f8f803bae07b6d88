"""The whole pipeline with the anchors on: TRAK's features, traker beside, every curation
selector, one closed-loop round, and the report — through the real CLI on the tiny recipe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from tests.conftest import TINY, build_run
from tests.conftest import grasp_ok as ok

pytest.importorskip("trak")
pytest.importorskip("data_selection")

SETS = [
    "--set", "sketch.trak_k=24",
    "--set", 'surrogate.alignment_grid=["plain", "kernel"]',
    "--set", "surrogate.quadratic_grid=[true, false]",
    "--set", "surrogate.cost_curve=[]",
    "--set", "loop.subsets=2",
]  # fmt: skip
STAGES = [
    ["prepare"],
    ["sketch", *SETS],
    ["retrain-subsets", *SETS],
    ["fit-surrogate", *SETS],
    ["select", *SETS],
    ["retrain-subsets", "--loop", *SETS],
    ["fit-surrogate", *SETS],
    ["select", *SETS],
    ["retrain-subsets", "--curation", *SETS],
    ["report", *SETS],
]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRASP_PROGRESS", "0")
        yield build_run(tmp_path_factory.mktemp("anchored") / "run", STAGES)


def test_sketches_hold_trak_features_and_trakers_scores(run):
    group = zarr.open_group(str(run / "sketches.zarr"), mode="r")
    n = group["train"].shape[0]
    assert group["trak_train"].shape == (n, 24) and group["trak_q"].shape == (n,)
    assert group["trak_tasks"].shape == (2, 24)
    q = np.asarray(group["trak_q"][:])
    assert ((q > 0) & (q < 1)).all()  # mean (1 − p) over tokens
    lambdas = group.attrs["trak_ref"]["rel_lambdas"]
    assert group["trak_ref_scores"].shape == (n, 2 * len(lambdas))
    assert "sketches   ok" in ok("status", "-c", TINY, "--run", run, *SETS)


def test_grasp_family_and_anchored_baselines(run):
    folder = run / "surrogate"
    lcb = pq.read_table(folder / "lcb.parquet").to_pylist()
    grasp = [r for r in lcb if r["method"] == "grasp"]
    assert {r["features"] for r in grasp} == {"sketch", "trak"}
    assert {r["quadratic"] for r in grasp} == {True, False}
    assert {r["alignment"] for r in grasp} == {"plain", "kernel"}
    methods = {r["method"] for r in pq.read_table(folder / "evaluation.parquet").to_pylist()}
    assert {"grasp", "additive", "trak", "trak-ref", "datamodels", "regmix"} <= methods
    params = json.loads((folder / "params.json").read_text())
    assert params["baselines"]["trak"]["features"] == "trak"
    comparison = pq.read_table(folder / "comparison.parquet").to_pylist()
    for suite in {r["suite"] for r in comparison}:
        rows = [r for r in comparison if r["suite"] == suite]
        assert sum(r["best"] for r in rows) == 1
        for r in rows:
            assert r["ci_low"] <= r["difference"] <= r["ci_high"]
            assert r["difference"] == pytest.approx(r["method_spearman"] - r["baseline_spearman"])


def test_closed_loop_round_is_fit_data(run):
    round_one = run / "loop" / "round-001"
    with np.load(round_one / "subsets.npz") as data:
        assert list(data["kinds"]) == ["proposal", "swap-any", "swap-domain"]
    surrogate = json.loads((run / "surrogate" / "_grasp" / "manifest.json").read_text())
    assert surrogate["extra"]["loop_rounds"] == [1]
    params = json.loads((run / "surrogate" / "params.json").read_text())
    predictions = pq.read_table(run / "surrogate" / "predictions.parquet").to_pylist()
    n_subsets = zarr.open_group(str(run / "subsets.zarr"), mode="r")["role"].shape[0]
    loop_ids = {r["subset_id"] for r in predictions if r["subset_id"] >= n_subsets}
    assert loop_ids == {n_subsets, n_subsets + 1, n_subsets + 2}
    assert all(r["role"] == "fit" for r in predictions if r["subset_id"] in loop_ids)
    assert params["n_fit"] == len({r["subset_id"] for r in predictions if r["role"] == "fit"})


def test_every_curation_selector_is_trained_with_three_seeds(run):
    manifest = json.loads((run / "selection" / "_grasp" / "manifest.json").read_text())
    selections = manifest["extra"]["selections"]
    expected = {
        "grasp", "grasp-open", "grasp-trust", "random", "additive", "trak", "domain-match",
        "regmix", "dsir", "dsir-ref", "whole",
    }  # fmt: skip
    assert set(selections) == expected, manifest["extra"]["curation_skipped"]
    budget = manifest["extra"]["budget"]
    assert all(size == budget for name, size in selections.items() if name != "whole")
    rows = [
        r
        for p in sorted((run / "curation").glob("part-*.parquet"))
        for r in pq.read_table(p).to_pylist()
    ]
    seeds = {(r["role"], r["seed"]) for r in rows}
    assert len(seeds) == len(expected) * 3
    page = (run / "report" / "index.html").read_text()
    assert "Closed loop" in page and "GRASP − each other selection" in page
    assert "Repeated content" in page


def test_repeated_slots_of_every_selection_match_a_count_over_its_rows(run):
    """The manifest's repeats table, recounted from the corpus rows and curation.parquet."""
    from grasp_cli.artifacts.examples import read_examples

    manifest = json.loads((run / "selection" / "_grasp" / "manifest.json").read_text())
    repeats = manifest["extra"]["repeats"]
    corpus = read_examples(run / "corpus")
    content = {
        int(i): row.tobytes() for i, row in zip(corpus.ids, corpus.fields["tokens"], strict=True)
    }
    curation = pq.read_table(run / "selection" / "curation.parquet").to_pylist()
    members: dict[str, list[int]] = {"corpus": [int(i) for i in corpus.ids]}
    for r in curation:
        members.setdefault(r["selection"], []).append(r["id"])
    assert set(repeats) == set(members)  # "whole" is the corpus
    for name, ids in members.items():
        slots = len(ids) - len({content[i] for i in ids})
        assert repeats[name] == {"rows": len(ids), "slots": slots, "share": slots / len(ids)}


def test_a_grasp_on_trak_features_scores_and_selects(run, tmp_path):
    """When the LCB gives GRASP TRAK's features (as on the vision demo), score and select work
    on those features: the subsets' predicted utilities equal fit-surrogate's predictions."""
    from tests.conftest import copy_run

    names = ("corpus", "tasks", "reference", "sketches.zarr", "subsets.zarr", "retrain")
    other = copy_run(run, tmp_path / "other", names)
    only_trak = [*SETS, "--set", 'surrogate.feature_grid=["trak"]', "--set", "loop.subsets=2"]
    for stage in (["fit-surrogate"], ["score"], ["select"]):
        ok(*stage, "-c", TINY, "--run", other, *only_trak)
    params = json.loads((other / "surrogate" / "params.json").read_text())
    assert params["grasp"]["features"] == "trak"
    predicted = {
        (r["subset_id"], r["task"]): r["predicted_utility"]
        for r in pq.read_table(other / "surrogate" / "predictions.parquet").to_pylist()
        if r["method"] == "grasp"
    }
    scored = pq.read_table(other / "scores" / "subsets.parquet").to_pylist()
    shared = [r for r in scored if (r["subset_id"], r["task"]) in predicted]
    assert shared
    for r in shared:
        expected = predicted[(r["subset_id"], r["task"])]
        assert r["predicted_utility"] == pytest.approx(expected, rel=1e-6, abs=1e-9)
