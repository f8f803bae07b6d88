"""A run directory that remembers and explains itself (issue 17, parts 1–5).

- the effective configuration is saved in ``RUN/config.toml`` and later stages and ``status``
  start from it (flags and ``--set`` are remembered); θ0 is never rebuilt unless asked;
- a failed input check never touches a finished artifact;
- artifacts open with the usual data tools (pandas, pyarrow.dataset, zarr, xarray) and with
  ``grasp_cli.load_run``;
- column names, units and signs agree across artifacts;
- ``status --check`` / ``--json``, valid-TOML ``--dry-run``, ``--quiet``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import tomllib
import zarr

import grasp_cli
from grasp_cli.config import load_config, to_toml
from grasp_cli.errors import InputError
from tests.conftest import TINY, build_run, copy_run, grasp_ok, one_line_error, run_grasp

STAGES = [["prepare"], ["sketch"], ["retrain-subsets"], ["fit-surrogate"], ["score"], ["select"]]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_run(tmp_path_factory.mktemp("rundir") / "run", STAGES)


def status_of(run: Path, *extra: object) -> dict:
    code, out, err = run_grasp("status", "-c", TINY, "--run", run, "--json", *extra)
    assert code in (0, 1), err
    return json.loads(out)


def refused(*args: object) -> str:
    """Run a command that must fail with exit 2 and one ``error:`` line; returns the line."""
    code, out, err = run_grasp(*args)
    assert code == 2, f"exit {code}\n{out}\n{err}"
    return one_line_error(err)


ALL = ("corpus", "tasks", "reference", "sketches.zarr", "subsets.zarr", "retrain", "surrogate")


# ---------------------------------------------------------------- 1. the run remembers


def test_flags_and_overrides_are_remembered_by_later_stages_and_status(base, tmp_path):
    run = copy_run(base, tmp_path / "run", ALL)
    given = tmp_path / "given.parquet"
    ids = pq.read_table(run / "corpus" / "part-00000.parquet").column("id").to_pylist()
    pq.write_table(pa.table({"subset_id": [0] * 5 + [1] * 7, "id": ids[:5] + ids[:7]}), given)
    grasp_ok("score", "-c", TINY, "--run", run, "--subsets", given)
    grasp_ok("select", "-c", TINY, "--run", run, "--budget", "9")
    recorded = tomllib.loads((run / "config.toml").read_text())
    assert recorded["score"]["subsets"] == str(given)
    assert recorded["select"]["budget"] == 9
    states = status_of(run)["artifacts"]  # a plain status, without the flags
    assert states["scores"]["state"] == "ok", states["scores"]
    assert states["selection"]["state"] == "ok", states["selection"]
    assert pq.read_table(run / "selection" / "selected.parquet").num_rows == 9
    # a later stage without the flag uses the remembered value
    grasp_ok("select", "-c", TINY, "--run", run, "--force")
    assert pq.read_table(run / "selection" / "selected.parquet").num_rows == 9
    # --set is remembered too, and a flag or --set still wins over the record
    grasp_ok("select", "-c", TINY, "--run", run, "--set", "select.budget=11")
    assert pq.read_table(run / "selection" / "selected.parquet").num_rows == 11
    assert status_of(run)["artifacts"]["selection"]["state"] == "ok"


def test_an_edited_prepare_section_shows_the_corpus_stale(base, tmp_path):
    run = copy_run(base, tmp_path / "run", ("corpus", "tasks"))
    assert status_of(run)["artifacts"]["corpus"]["state"] == "ok"
    states = status_of(run, "--set", "prepare.seq_len=48")["artifacts"]
    assert states["corpus"]["state"] == "stale" and "seq_len" in states["corpus"]["detail"]
    line = refused("sketch", "-c", TINY, "--run", run, "--set", "prepare.seq_len=48")
    assert line.startswith("error: stale:") and "corpus" in line


def test_theta0_from_a_checkpoint_is_kept_and_never_retrained(base, tmp_path):
    import torch

    run = copy_run(base, tmp_path / "run", ("corpus", "tasks"))
    checkpoint = tmp_path / "theta0.pt"
    torch.save(torch.load(base / "reference" / "model.pt", weights_only=True), checkpoint)
    grasp_ok("sketch", "-c", TINY, "--run", run, "--checkpoint", checkpoint)
    before = json.loads((run / "reference" / "_grasp" / "manifest.json").read_text())
    model_bytes = (run / "reference" / "model.pt").read_bytes()
    grasp_ok("retrain-subsets", "-c", TINY, "--run", run, "--limit", "2")  # no --checkpoint
    after = json.loads((run / "reference" / "_grasp" / "manifest.json").read_text())
    assert after["fingerprint"] == before["fingerprint"]
    assert (run / "reference" / "model.pt").read_bytes() == model_bytes
    assert status_of(run)["artifacts"]["sketches"]["state"] == "ok"
    # asking for another θ0 is refused clearly, not silently retrained
    line = refused("retrain-subsets", "-c", TINY, "--run", run, "--set", "reference.checkpoint=''")
    assert "θ0" in line and "--force" in line
    assert (run / "reference" / "model.pt").read_bytes() == model_bytes


# ---------------------------------------------------------------- 2. failed checks change nothing


def test_a_bad_subsets_file_leaves_finished_scores_intact(base, tmp_path):
    run = copy_run(base, tmp_path / "run", (*ALL, "scores"))
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"subset_id": ["a", "b"], "id": [1, 2]}), bad)
    before = {p: p.read_bytes() for p in sorted((run / "scores").rglob("*")) if p.is_file()}
    line = refused("score", "-c", TINY, "--run", run, "--subsets", bad)
    assert str(bad) in line
    after = {p: p.read_bytes() for p in sorted((run / "scores").rglob("*")) if p.is_file()}
    assert after == before
    assert status_of(run)["artifacts"]["scores"]["state"] == "ok"


# ---------------------------------------------------------------- 3. data tools open artifacts


def test_artifact_folders_open_as_datasets(base):
    import pandas as pd

    corpus = pd.read_parquet(base / "corpus")
    parts = [pq.read_table(p) for p in sorted((base / "corpus").glob("part-*.parquet"))]
    assert len(corpus) == sum(p.num_rows for p in parts)
    assert {"id", "domain", "tokens"} <= set(corpus.columns)
    retrain = ds.dataset(base / "retrain", format="parquet").to_table()
    assert retrain.num_rows > 0 and "utility" in retrain.column_names
    examples = pd.read_parquet(base / "scores" / "examples")
    assert len(examples) == len(corpus) * 2  # two tasks


def test_zarr_stores_have_dimension_names_and_no_foreign_files(base):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zarr warns about files it does not know
        group = zarr.open_group(str(base / "sketches.zarr"), mode="r")
        names = sorted(name for name, _ in group.arrays())
    assert {"train", "train_ids", "tasks", "task_names"} <= set(names)
    assert group["train"].metadata.dimension_names == ("example", "dim")
    assert group["train_ids"].metadata.dimension_names == ("example",)
    subsets = zarr.open_group(str(base / "subsets.zarr"), mode="r")
    for name, array in subsets.arrays():
        assert array.metadata.dimension_names is not None, name
        assert array.metadata.dimension_names[0] == "subset", name


def test_xarray_opens_the_sketch_store(base):
    import xarray as xr  # in the test extra (users need it only to open stores this way)

    dataset = xr.open_zarr(base / "sketches.zarr", consolidated=False)
    n = pq.ParquetDataset(base / "corpus").read(columns=["id"]).num_rows
    assert dataset["train"].dims == ("example", "dim") and dataset.sizes["example"] == n


def test_load_run_returns_tables_and_arrays(base):
    run = grasp_cli.load_run(base)
    assert run.corpus(["id", "domain"]).num_rows == run.sketches().n
    assert set(run.tasks()) == {"docs", "email"}
    evaluation = run.evaluation()
    assert "grasp" in set(evaluation.column("method").to_pylist())
    assert run.selection().num_rows > 0
    assert run.config()["sketch"]["k"] == 32
    assert np.asarray(run.sketches().train[:4]).shape == (4, 32)
    with pytest.raises(InputError, match="curation"):
        run.curation()


# ---------------------------------------------------------------- 4. names, units, signs


def test_columns_agree_on_names_units_and_signs(base):
    retrain = ds.dataset(base / "retrain", format="parquet").to_table()
    loss = np.array(retrain.column("metric").to_pylist()) == "loss"
    np.testing.assert_array_equal(
        retrain.column("utility").to_numpy()[loss], -retrain.column("value").to_numpy()[loss]
    )
    predictions = pq.read_table(base / "surrogate" / "predictions.parquet")
    assert {"predicted_utility", "measured_utility"} <= set(predictions.column_names)
    # measured_utility is the retrain utility of the same subset and task (seed of the fit)
    first = {
        (r["subset_id"], r["task"]): r["utility"]
        for r in retrain.to_pylist()
        if r["metric"] == "loss" and r["seed"] == min(retrain.column("seed").to_pylist())
    }
    for row in predictions.to_pylist()[:20]:
        assert row["measured_utility"] == pytest.approx(first[(row["subset_id"], row["task"])])
    lcb = pq.read_table(base / "surrogate" / "lcb.parquet")
    assert lcb.schema.field("k").type == pa.int64()
    methods = set(pq.read_table(base / "surrogate" / "evaluation.parquet").column("method"))
    assert "regmix" in {str(m) for m in methods} and "mixture" not in {str(m) for m in methods}
    selected = pq.read_table(base / "selection" / "selected.parquet")
    assert "objective_gain" in selected.column_names and "gain" not in selected.column_names
    subsets = pq.read_table(base / "scores" / "subsets.parquet").to_pandas()
    assert (subsets["redundancy"] >= -1e-12).all()  # the penalty subtracted, b ≥ 0, G ⪰ 0


# ---------------------------------------------------------------- 5. scripting


def test_status_check_and_json(base, tmp_path):
    assert run_grasp("status", "-c", TINY, "--run", base, "--check")[0] == 1  # no curation yet
    run = copy_run(base, tmp_path / "run", ("corpus", "tasks"))
    document = status_of(run)
    assert document["complete"] is False
    assert document["artifacts"]["corpus"]["state"] == "ok"
    assert document["artifacts"]["sketches"]["state"] == "missing"
    assert document["artifacts"]["sketches"]["stage"] == "sketch"
    (run / "sketches.zarr").mkdir()
    assert status_of(run)["artifacts"]["sketches"]["state"] == "incomplete"
    code, out, _ = run_grasp("status", "-c", TINY, "--run", run)
    assert code == 0 and "sketches" in out  # without --check, a report, not a verdict


def test_dry_run_prints_valid_toml_that_loads_back(tmp_path):
    code, out, err = run_grasp(
        "select", "-c", TINY, "--run", tmp_path / "r", "--dry-run", "--set", "select.budget=0.3"
    )
    assert code == 0, err
    text = out.split("# stage:")[0]
    document = tomllib.loads(text)  # valid TOML, inf/nan included
    assert document["select"]["budget"] == 0.3
    saved = tmp_path / "saved.toml"
    saved.write_text(text)
    assert to_toml(load_config(saved)) == to_toml(load_config(TINY, ["select.budget=0.3"]))


def test_quiet_stages_print_no_progress(tmp_path, capfd):
    build_run(tmp_path / "run", [["prepare", "--quiet"], ["sketch", "--quiet"]])
    err = capfd.readouterr().err
    assert err == "", err


def test_help_and_status_never_import_torch(tmp_path):
    """`grasp --help`, a stage's help and `grasp status` answer without importing torch (which
    takes seconds): the CLI imports each stage's code only when the stage runs."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from grasp_cli.cli import entry\n"
        "sys.argv = ['grasp'] + sys.argv[1:]\n"
        "try:\n"
        "    entry()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n"
    )
    for args in (["--help"], ["sketch", "--help"], ["status", "--run", str(tmp_path / "run")]):
        done = subprocess.run(
            [sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120
        )
        assert done.stderr.strip().endswith("NO-TORCH"), (args, done.stderr[-400:])
    storage = (  # the storage layer: a data tool can read a run without torch
        "import sys, grasp_cli.artifacts.examples, grasp_cli.artifacts.sketches, "
        "grasp_cli.artifacts.subsets, grasp_cli.artifacts.results, grasp_cli.artifacts.manifest\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    done = subprocess.run([sys.executable, "-c", storage], capture_output=True, text=True)
    assert done.stdout.strip() == "NO-TORCH", done.stderr[-400:]
