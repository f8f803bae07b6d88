"""The SLURM scale-out on a real cluster: scripts/slurm/ templates and driver, end to end.

A private one-node SLURM (tests/slurm_cluster.py: own munged, slurmctld and slurmd in a
temporary folder, no systemd) runs the whole pipeline as ``scripts/slurm/submit.sh`` submits it,
the heavy stages as job arrays of 3 tasks; every job must complete, the work must really be
split, and the sketches and retrain results must equal those of one plain process bit for bit.
Then a retrain array submitted by hand stops every task after one run (``--limit 1``, as a kill
would), and a resubmission must train only what is missing. SLURM is installed with apt-get
when absent; where that is impossible the cluster tests skip and say why. The driver's
command lines and error handling are also checked without a cluster (dry run, a fake sbatch).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from grasp_cli.artifacts.layout import RunLayout
from grasp_cli.artifacts.manifest import read_manifest
from grasp_cli.artifacts.shards import ShardSpec, owned_units
from grasp_cli.cli import main
from grasp_cli.sketch.stage import unit_costs
from tests.conftest import copy_run, result_rows
from tests.slurm_cluster import LocalCluster, ensure_slurm

ROOT = Path(__file__).resolve().parents[1]
SLURM_SCRIPTS = ROOT / "scripts" / "slurm"
SUBMIT = SLURM_SCRIPTS / "submit.sh"
SHARDS = 3
N_ROWS = 48  # 4 domains x max_seqs_per_domain 12
CHUNK_ROWS = 8
N_JOBS = 9 + 3 + 1  # mixture 9 + within 3 subsets, + repeat_subsets 1 with one extra seed
JOB_TIMEOUT_S = 180
# The jobs submit.sh makes, in order, and whether each is an array.
STAGES = {
    "prepare": False, "reference": False, "sketch": True, "retrain": True, "fit-surrogate": False,
    "score": True, "select": False, "curation": True, "report": False,
}  # fmt: skip
# Every array task gets one CPU so that the tasks of an array really run side by side.
SBATCH_RESOURCES = ["--cpus-per-task=1", "--mem=1G", "--time=10"]

CONFIG = f"""
[run]
seed = 0
threads = 1

[prepare]
demo = true
demo_domains = ["docs", "json", "email", "asyncio"]
holdout_domains = ["docs", "email"]
holdout_fraction = 0.25
max_docs_per_domain = 40
max_seqs_per_domain = 12
max_task_seqs = 8
seq_len = 32
shard_rows = 20

[model]
kind = "transformer"
n_layer = 2
n_head = 2
d_model = 16

[reference]
slice_fraction = 0.5
steps = 20
batch_size = 8
lr = 3e-3
warmup_steps = 5

[sketch]
projection = "kronecker"
k = 32
kron_dim = 4
batch_size = 8
chunk_rows = {CHUNK_ROWS}

[subsets]
designs = {{ mixture = 9, within = 3 }}
eval_fraction = 0.35
size_min = 0.2
size_max = 0.5

[retrain]
init = "reference"
steps = 5
batch_size = 8
lr = 1e-3
warmup_steps = 1
repeat_subsets = 1
repeat_seeds = 1
eval_batch_size = 64

[surrogate]
k_grid = [8, 32]
geometry_grid = ["identity", "diagonal"]
ridge_grid = [1.0, inf]
aggregation_grid = ["mean"]
folds = 3
repeats = 1
bootstrap = 100
cost_curve = [6]

[score]
chunk_rows = 16

[select]
budget = 0.25
"""


def grasp_executable() -> Path:
    """The `grasp` of the interpreter running the tests (the venv's), by absolute path."""
    beside = Path(sys.executable).with_name("grasp")
    found = beside if beside.is_file() else shutil.which("grasp")
    assert found, "no `grasp` executable beside the test interpreter or on PATH; pip install -e ."
    return Path(found).absolute()


def grasp(*args: object) -> str:
    """Run `grasp ARGS...` in this process; fail the test on a non-zero exit."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in args])
    assert code == 0, (
        f"grasp {' '.join(map(str, args))} -> {code}\n{out.getvalue()}\n{err.getvalue()}"
    )
    return out.getvalue()


def assert_same_sketches(ours: Path, theirs: Path) -> None:
    a, b = (zarr.open_group(str(p / "sketches.zarr"), mode="r") for p in (ours, theirs))
    for name in ("train", "train_ids", "tasks"):
        left, right = np.asarray(a[name][:]), np.asarray(b[name][:])
        assert left.dtype == right.dtype and left.shape == right.shape, name
        assert left.tobytes() == right.tobytes(), f"sketches.zarr/{name} differs"
    assert [str(n) for n in a["task_names"][:]] == [str(n) for n in b["task_names"][:]]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def clean_env():
    """No progress bars, no leaked SLURM array variables in the in-process runs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRASP_PROGRESS", "0")
        mp.delenv("GRASP_DEBUG", raising=False)
        for name in list(os.environ):
            if name.startswith("SLURM_"):
                mp.delenv(name)
        yield


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, clean_env):
    reason = ensure_slurm()
    if reason is not None:
        pytest.skip(f"no SLURM cluster possible here: {reason}")
    cluster = LocalCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny-slurm.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, config, clean_env) -> Path:
    """prepare, sketch, retrain-subsets in one plain process: the answer every split must give."""
    run = tmp_path_factory.mktemp("local") / "run"
    for stage in ("prepare", "sketch", "retrain-subsets"):
        grasp(stage, "--config", config, "--run", run)
    return run


@pytest.fixture(scope="module")
def job_env(cluster, config) -> dict[str, str]:
    """What a job needs: the cluster's SLURM_CONF, the venv's grasp, the config."""
    exe = grasp_executable()
    return {
        **cluster.env,
        "GRASP": str(exe),
        "PATH": f"{exe.parent}{os.pathsep}{cluster.env['PATH']}",
        "CONFIG": str(config),
        "GRASP_PROGRESS": "0",
    }


def sbatch(cluster: LocalCluster, env: dict[str, str], *args: str) -> str:
    done = cluster.client(["sbatch", "--parsable", *args], env=env)
    return done.stdout.strip().split(";")[0]


def assert_all_completed(cluster: LocalCluster, job_id: str, tasks: int | None) -> None:
    """Every array task (or the single job) ended COMPLETED with exit code 0."""
    records = cluster.job_records(job_id)
    if tasks is not None:
        assert sorted(int(r["ArrayTaskId"]) for r in records) == list(range(tasks)), records
    else:
        assert len(records) == 1 and "ArrayTaskId" not in records[0], records
    for record in records:
        state = (record["JobState"], record["ExitCode"])
        log = Path(record.get("StdOut", ""))
        text = log.read_text(errors="replace") if log.is_file() else f"(no log at {log})"
        where = f"{record.get('JobName')} job {record.get('JobId')} task {record.get('ArrayTaskId', '-')}"
        assert state == ("COMPLETED", "0:0"), f"{where}: {state[0]}, exit {state[1]}\n{text}"


def logs(run: Path, name: str, job_id: str) -> list[str]:
    """The array task logs ``RUN/logs/<name>-<job>_<task>.out``, in task order."""
    return [(run / "logs" / f"{name}-{job_id}_{task}.out").read_text() for task in range(SHARDS)]


def shard_units(units: int, costs: list[float] | None = None) -> list[range]:
    """The units each of the SHARDS array tasks owns."""
    return [owned_units(units, ShardSpec(index, SHARDS), costs) for index in range(SHARDS)]


def counts(pattern: str, texts: list[str]) -> list[int]:
    found = [re.search(pattern, text) for text in texts]
    assert all(found), f"no {pattern!r} in a log:\n" + "\n---\n".join(texts)
    return [int(m.group(1)) for m in found]


# ---------------------------------------------------------------- driver, no cluster needed


def test_submit_dry_run_prints_the_dependency_chain(tmp_path, config):
    env = {**os.environ, "GRASP": "/opt/grasp/bin/grasp"}
    run = tmp_path / "run"
    done = subprocess.run(
        [SUBMIT, config, run, "--shards", "4", "--retrain-shards", "6", "--partition", "cpu",
         "--dry-run", "--", "--account=lab"],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("sbatch ")]
    by_name = {re.search(r"--job-name=grasp-(\S+)", line).group(1): line for line in lines}
    assert list(by_name) == [
        "prepare", "reference", "sketch", "retrain", "fit-surrogate",
        "score", "select", "curation", "report",
    ]  # fmt: skip
    for line in lines:
        assert "--partition=cpu" in line and "--account=lab" in line and "--parsable" in line
    assert "--array=0-3" in by_name["sketch"] and "--array=0-5" in by_name["retrain"]
    assert "--array" not in by_name["reference"] and "--array" not in by_name["fit-surrogate"]
    assert by_name["reference"].endswith("stage.sbatch sketch --shard 0 --num-shards 4")
    # θ0 is built once, by the reference job; both heavy arrays wait for it, not for each other
    assert "--dependency=afterok:JOB_reference " in by_name["sketch"]
    assert "--dependency=afterok:JOB_reference " in by_name["retrain"]
    assert "--dependency=afterok:JOB_sketch:JOB_retrain " in by_name["fit-surrogate"]
    assert by_name["curation"].endswith("retrain.sbatch --curation")
    assert f"--output={run}/logs/%x-%A_%a.out" in by_name["score"]
    assert not run.exists()  # a dry run creates nothing


FAKE_SBATCH = """#!/usr/bin/env bash
# Records its arguments; answers like `sbatch --parsable` on a federated cluster ("id;cluster").
n=$(( $(wc -l < "$SBATCH_LOG" 2>/dev/null || echo 0) + 1 ))
echo "$*" >> "$SBATCH_LOG"
[[ "$n" == "${SBATCH_FAIL_AT:-0}" ]] && { echo "sbatch: error: QOS limit" >&2; exit 1; }
echo "$((100 + n));cluster1"
"""


def fake_sbatch(tmp_path: Path, fail_at: int = 0) -> tuple[dict[str, str], Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    (bin_dir / "grasp").write_text("#!/bin/sh\n")
    (bin_dir / "grasp").chmod(0o755)
    log = tmp_path / "sbatch.log"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SBATCH_LOG": str(log),
        "SBATCH_FAIL_AT": str(fail_at),
    }
    env.pop("GRASP", None)
    return env, log


def test_submit_chains_the_job_ids_sbatch_returns(tmp_path, config):
    env, log = fake_sbatch(tmp_path)
    run = tmp_path / "run"
    done = subprocess.run(
        [SUBMIT, config, run, "--shards", "2", "--from", "reference", "--until", "select"],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    printed = dict(line.split()[:2] for line in done.stdout.splitlines()[:-1])
    assert printed == {
        "reference": "101", "sketch": "102", "retrain": "103", "fit-surrogate": "104",
        "score": "105", "select": "106",
    }  # fmt: skip
    calls = log.read_text().splitlines()
    assert "--dependency" not in calls[0]  # prepare was not submitted: nothing to wait for
    assert "--dependency=afterok:101 " in calls[1] and "--dependency=afterok:101 " in calls[2]
    assert "--dependency=afterok:102:103 " in calls[3]
    assert "--dependency=afterok:104 " in calls[4] and "--dependency=afterok:104 " in calls[5]
    assert f"{tmp_path}/bin/grasp status" in done.stdout  # grasp found on PATH, by absolute path
    assert (run / "logs").is_dir()


def test_submit_stops_at_the_first_failed_sbatch(tmp_path, config):
    env, log = fake_sbatch(tmp_path, fail_at=3)
    done = subprocess.run(
        [SUBMIT, config, tmp_path / "run"], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 1
    assert len(log.read_text().splitlines()) == 3  # nothing after the failure
    assert "sbatch failed for stage sketch" in done.stderr
    assert "already submitted: 101 102 (scancel them" in done.stderr


def test_submit_refuses_without_sbatch(tmp_path, config):
    bin_dir = tmp_path / "bin"  # the tools the driver needs, but no sbatch
    bin_dir.mkdir()
    for tool in ("dirname", "realpath", "sed"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {**os.environ, "PATH": str(bin_dir)}
    done = subprocess.run(
        ["/bin/bash", SUBMIT, config, tmp_path / "run"],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    assert "sbatch not found" in done.stderr


# ---------------------------------------------------------------- a real cluster


@pytest.mark.slurm
def test_submitted_pipeline_completes_and_arrays_equal_one_process(
    cluster, config, local_run, job_env, tmp_path
):
    run = tmp_path / "run"
    done = subprocess.run(
        [SUBMIT, config, run, "--shards", str(SHARDS), "--retrain-shards", str(SHARDS),
         "--score-shards", str(SHARDS), "--curation-shards", str(SHARDS), "--", *SBATCH_RESOURCES],
        env=job_env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    job = dict(line.split()[:2] for line in done.stdout.splitlines() if line.split()[0] in STAGES)
    assert list(job) == list(STAGES), done.stdout
    cluster.wait(list(job.values()), JOB_TIMEOUT_S)
    for stage, array in STAGES.items():
        assert_all_completed(cluster, job[stage], tasks=SHARDS if array else None)
    assert (run / "report" / "index.html").is_file()
    status = grasp("status", "--config", config, "--run", run).splitlines()[1:]
    assert status and all(line.split()[1] == "ok" for line in status), "\n".join(status)

    # The work really was split: the reference job sketched shard 0 (so array task 0 found
    # nothing left), tasks 1 and 2 their own rows; each retrain task trained its own runs.
    # Units are split by their cost in gradient passes (row chunks, the task unit, traker's).
    n_chunks = -(-N_ROWS // CHUNK_ROWS)
    sketches = zarr.open_group(str(run / "sketches.zarr"), mode="r")
    costs = unit_costs(
        N_ROWS,
        CHUNK_ROWS,
        task_rows=sum(read_manifest(run / "tasks").extra["tasks"].values()),
        trak="trak_train" in sketches,
        trak_ref="trak_ref_scores" in sketches,
    )
    rows = [
        sum(min(CHUNK_ROWS, N_ROWS - u * CHUNK_ROWS) for u in units if u < n_chunks)
        for units in shard_units(len(costs), costs)
    ]
    reference_log = (run / "logs" / f"grasp-reference-{job['reference']}.out").read_text()
    assert counts(r"sketch: (\d+) rows", [reference_log]) == rows[:1]
    assert counts(r"sketch: (\d+) rows", logs(run, "grasp-sketch", job["sketch"])) == [0, *rows[1:]]
    trained = counts(r"trained (\d+) runs", logs(run, "grasp-retrain", job["retrain"]))
    assert trained == [len(units) for units in shard_units(N_JOBS)]

    corpus = [
        pa.concat_tables(pq.read_table(p) for p in sorted((r / "corpus").glob("part-*.parquet")))
        for r in (run, local_run)
    ]
    assert corpus[0].equals(corpus[1])  # prepare under SLURM made the same corpus
    for name in ("reference", "sketches", "subsets", "retrain"):
        manifest = read_manifest(RunLayout(run).path(name))
        assert manifest is not None and manifest.complete, name
    theta_slurm, theta_local = (
        torch.load(r / "reference" / "model.pt", weights_only=True) for r in (run, local_run)
    )
    assert theta_slurm.keys() == theta_local.keys()
    assert all(torch.equal(theta_slurm[k], theta_local[k]) for k in theta_local)
    assert_same_sketches(run, local_run)
    membership = [np.asarray(zarr.open_group(str(r / "subsets.zarr"), mode="r")["membership"][:]) for r in (run, local_run)]  # fmt: skip
    assert np.array_equal(*membership)
    assert len(list((run / "retrain").glob("part-*.parquet"))) == N_JOBS
    assert result_rows(run / "retrain") == result_rows(local_run / "retrain")


@pytest.mark.slurm
def test_resubmitted_array_trains_only_missing_runs(cluster, config, local_run, job_env, tmp_path):
    run = copy_run(local_run, tmp_path / "run", ("corpus", "tasks", "reference"))
    (run / "logs").mkdir()
    env = {**job_env, "RUN": str(run)}
    script = str(SLURM_SCRIPTS / "retrain.sbatch")
    output = f"--output={run}/logs/%x-%A_%a.out"

    # Every task stops after one run, as if killed after its first unit.
    first = sbatch(cluster, env, f"--array=0-{SHARDS - 1}", output, *SBATCH_RESOURCES, script, "--limit", "1")  # fmt: skip
    cluster.wait([first], JOB_TIMEOUT_S)
    assert_all_completed(cluster, first, tasks=SHARDS)
    assert counts(r"trained (\d+) runs", logs(run, "grasp-retrain", first)) == [1] * SHARDS
    status = grasp("status", "--config", config, "--run", run)
    missing = N_JOBS - SHARDS
    assert re.search(rf"retrain\s+incomplete: {missing}/{N_JOBS} units missing", status), status

    second = sbatch(cluster, env, f"--array=0-{SHARDS - 1}", output, *SBATCH_RESOURCES, script)
    cluster.wait([second], JOB_TIMEOUT_S)
    assert_all_completed(cluster, second, tasks=SHARDS)
    trained = counts(r"trained (\d+) runs", logs(run, "grasp-retrain", second))
    assert trained == [len(units) - 1 for units in shard_units(N_JOBS)]
    assert read_manifest(run / "retrain").complete
    assert len(list((run / "retrain").glob("part-*.parquet"))) == N_JOBS
    assert result_rows(run / "retrain") == result_rows(local_run / "retrain")
