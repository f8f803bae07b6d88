"""Faults: jobs killed with SIGKILL mid-way, concurrent workers, corrupt files, stale and NaN inputs.

Stages run as real subprocesses. To land the kill mid-way on a busy machine, a small
bootstrap makes the process stop at a chosen point (after its first unit's marker,
or inside the atomic rename of a result file) and signals that it got there; the
test then kills it with SIGKILL. The rerun must finish exactly the missing work and
give artifacts identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grasp_cli.artifacts.manifest import read_manifest
from tests.conftest import (
    assert_same_sketches,
    build_run,
    copy_run,
    one_line_error,
    result_rows,
)
from tests.conftest import grasp_ok as ok
from tests.conftest import run_grasp as grasp

CONFIG = Path(__file__).with_name("tiny.toml")
REPO = Path(__file__).resolve().parents[1]
N_SUBSETS, N_JOBS = 16, 19
ALL_FIT = ("corpus", "tasks", "reference", "sketches.zarr", "subsets.zarr", "retrain", "surrogate")

# Runs the real CLI; optionally stops (sleeps) at a chosen point after writing a flag file,
# so that the test can SIGKILL the process exactly there.
BOOTSTRAP = r"""
import os, sys, time
from pathlib import Path

flag = os.environ.get("GRASP_TEST_FLAG")

def stop_here(what):
    Path(flag).write_text(what)
    time.sleep(600)

after_marks = int(os.environ.get("GRASP_TEST_STOP_AFTER_MARKS", "0"))
if after_marks:
    from grasp_cli.artifacts import shards

    original_mark = shards.UnitMarkers.mark_done
    count = [0]

    def mark_done(self, unit, **info):
        if count[0] >= after_marks:  # this unit's output is written, its marker is not
            stop_here(f"unit {unit}")
        count[0] += 1
        return original_mark(self, unit, **info)

    shards.UnitMarkers.mark_done = mark_done

replace_target = os.environ.get("GRASP_TEST_STOP_IN_REPLACE")
if replace_target:
    original_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith(replace_target):  # the temporary file is complete, not yet renamed
            stop_here(f"replace {dst}")
        return original_replace(src, dst, *args, **kwargs)

    os.replace = replace

from grasp_cli.cli import main

sys.exit(main(sys.argv[1:]))
"""


def spawn(args: list[object], flag: Path | None = None, **stops: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRASP_TEST_", "SLURM_ARRAY"))}
    env.update({"GRASP_PROGRESS": "0", "PYTHONPATH": str(REPO)})
    env.pop("GRASP_DEBUG", None)
    if flag is not None:
        env["GRASP_TEST_FLAG"] = str(flag)
    env.update({f"GRASP_TEST_{k.upper()}": v for k, v in stops.items()})
    return subprocess.Popen(
        [sys.executable, "-c", BOOTSTRAP, *map(str, args)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    """Poll until ``ready()``, then SIGKILL the process (it must not have exited first)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the job exited ({proc.returncode}) before the kill point\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the job never reached the kill point")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """An uninterrupted run of every stage up to score."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRASP_PROGRESS", "0")
        mp.delenv("GRASP_DEBUG", raising=False)
        stages = [["prepare"], ["sketch"], ["retrain-subsets"], ["fit-surrogate"], ["score"]]
        yield build_run(tmp_path_factory.mktemp("faults") / "base", stages)


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("GRASP_PROGRESS", "0")
    monkeypatch.delenv("GRASP_DEBUG", raising=False)


# ---------------------------------------------------------------- kill -9 and rerun


def test_sketch_killed_after_first_chunk_resumes_to_identical_arrays(base, tmp_path):
    run = copy_run(base, tmp_path / "run", ("corpus", "tasks", "reference"))
    flag = tmp_path / "flag"
    proc = spawn(["sketch", "-c", CONFIG, "--run", run], flag, stop_after_marks="1")
    kill_when(proc, flag.exists)
    folder = run / "sketches.zarr"
    assert read_manifest(folder).complete is False
    assert sorted(p.name for p in (folder / "_grasp" / "done").glob("*.json")) == ["000000.json"]
    status = ok("status", "-c", CONFIG, "--run", run)
    assert "incomplete: 6/7 units missing" in status
    code, _, err = grasp("fit-surrogate", "-c", CONFIG, "--run", run)
    assert code == 2 and "incomplete" in one_line_error(err)
    out = ok("sketch", "-c", CONFIG, "--run", run, "-q")
    assert "sketch: 80 rows" in out  # chunk 0 (16 rows) is not redone; the task unit has no rows
    assert read_manifest(folder).complete
    assert_same_sketches(base / "sketches.zarr", folder)
    assert read_manifest(folder).fingerprint == read_manifest(base / "sketches.zarr").fingerprint


def test_retrain_killed_inside_a_part_write_resumes_without_duplicates(base, tmp_path):
    run = copy_run(base, tmp_path / "run", ("corpus", "tasks", "reference", "sketches.zarr"))
    flag = tmp_path / "flag"
    proc = spawn(
        ["retrain-subsets", "-c", CONFIG, "--run", run], flag, stop_in_replace="part-000002.parquet"
    )
    kill_when(proc, flag.exists)
    folder = run / "retrain"
    assert sorted(p.name for p in folder.glob("part-*.parquet")) == [
        "part-000000.parquet",
        "part-000001.parquet",
    ]
    debris = list(folder.glob(".part-000002.parquet.tmp-*"))
    assert len(debris) == 1  # the half-done write left only a hidden temporary
    out = ok("retrain-subsets", "-c", CONFIG, "--run", run, "-q")
    assert f"trained {N_JOBS - 2} runs" in out
    assert read_manifest(folder).complete
    assert len(list(folder.glob("part-*.parquet"))) == N_JOBS
    rows = result_rows(folder)
    keys = [(r[0], r[5], r[2], r[3]) for r in rows]  # subset_id, seed, task, metric
    assert len(keys) == len(set(keys))
    assert rows == result_rows(base / "retrain")
    ok("fit-surrogate", "-c", CONFIG, "--run", run)  # the debris is never read as a result


def test_retrain_killed_at_first_part_resumes(base, tmp_path):
    """A plain SIGKILL as soon as the first result exists, wherever the job then is."""
    run = copy_run(base, tmp_path / "run", ("corpus", "tasks", "reference"))
    proc = spawn(["retrain-subsets", "-c", CONFIG, "--run", run])
    done = run / "retrain" / "_grasp" / "done"
    kill_when(proc, lambda: done.is_dir() and any(done.glob("*.json")))
    finished = len(list(done.glob("*.json")))
    assert 1 <= finished < N_JOBS
    out = ok("retrain-subsets", "-c", CONFIG, "--run", run, "-q")
    assert f"trained {N_JOBS - finished} runs" in out
    assert result_rows(run / "retrain") == result_rows(base / "retrain")


def test_score_killed_after_first_part_resumes_to_identical_tables(base, tmp_path):
    run = copy_run(base, tmp_path / "run", ALL_FIT)
    flag = tmp_path / "flag"
    proc = spawn(["score", "-c", CONFIG, "--run", run], flag, stop_after_marks="1")
    kill_when(proc, flag.exists)
    assert read_manifest(run / "scores").complete is False
    out = ok("score", "-c", CONFIG, "--run", run, "-q")
    assert "score: 3 parts written" in out  # 4 units, one finished before the kill
    assert read_manifest(run / "scores").complete
    for name in ["subsets.parquet", *(f"examples/part-{i:05d}.parquet" for i in range(3))]:
        assert pq.read_table(run / "scores" / name).equals(pq.read_table(base / "scores" / name)), (
            name
        )


# ---------------------------------------------------------------- concurrent workers


@pytest.mark.parametrize("stage", ["sketch", "retrain-subsets"])
def test_two_workers_on_the_same_shard_do_not_corrupt_it(base, tmp_path, stage):
    run = copy_run(base, tmp_path / "run", ("corpus", "tasks", "reference"))
    procs = [
        spawn([stage, "-c", CONFIG, "--run", run, "--shard", 0, "--num-shards", 1])
        for _ in range(2)
    ]
    outcomes = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    for code, _out, err in outcomes:
        if code != 0:  # allowed: one fails cleanly
            one_line_error(err)
    assert any(code == 0 for code, _, _ in outcomes), outcomes
    if stage == "sketch":
        assert read_manifest(run / "sketches.zarr").complete
        assert_same_sketches(base / "sketches.zarr", run / "sketches.zarr")
    else:
        assert read_manifest(run / "retrain").complete
        rows = result_rows(run / "retrain")
        assert len({(r[0], r[5], r[2], r[3]) for r in rows}) == len(rows)
        assert rows == result_rows(base / "retrain")


def test_a_job_array_starting_at_once_builds_one_artifact(base, tmp_path):
    """Four shards start together and race to create sketches.zarr; none may break it."""
    run = copy_run(base, tmp_path / "run", ("corpus", "tasks", "reference"))
    procs = [
        spawn(["sketch", "-c", CONFIG, "--run", run, "--shard", i, "--num-shards", 4])
        for i in range(4)
    ]
    outcomes = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert [code for code, _, _ in outcomes] == [0, 0, 0, 0], outcomes
    assert read_manifest(run / "sketches.zarr").complete
    assert_same_sketches(base / "sketches.zarr", run / "sketches.zarr")


# ---------------------------------------------------------------- corrupt files


def test_truncated_retrain_part_is_named(base, tmp_path):
    run = copy_run(
        base,
        tmp_path / "run",
        ("corpus", "tasks", "reference", "sketches.zarr", "subsets.zarr", "retrain"),
    )
    part = run / "retrain" / "part-000004.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    code, _, err = grasp("fit-surrogate", "-c", CONFIG, "--run", run)
    assert code == 2
    assert str(part) in one_line_error(err)


def test_truncated_corpus_shard_is_named(base, tmp_path):
    run = copy_run(base, tmp_path / "run", ("corpus", "tasks", "reference"))
    shard = run / "corpus" / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:200])
    for stage in ("sketch", "retrain-subsets"):
        code, _, err = grasp(stage, "-c", CONFIG, "--run", run)
        assert code == 2, stage
        assert str(shard) in one_line_error(err)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_zarr_chunk_is_named(base, tmp_path, damage):
    run = copy_run(base, tmp_path / "run", ALL_FIT)
    chunk = run / "sketches.zarr" / "train" / "c" / "2" / "0"
    assert chunk.is_file()
    data = chunk.read_bytes()
    chunk.write_bytes(
        {"garbage": b"\x00not zstd at all" * 8, "truncated": data[: len(data) // 2], "empty": b""}[
            damage
        ]
    )
    for stage in ("fit-surrogate", "score", "select"):
        code, _, err = grasp(stage, "-c", CONFIG, "--run", run, "--force")
        assert code == 2, (stage, err)
        line = one_line_error(err)
        assert str(chunk) in line and "corrupt" in line, line


def test_corrupt_subsets_metadata_is_named(base, tmp_path):
    names = ("corpus", "tasks", "reference", "sketches.zarr", "subsets.zarr", "retrain")
    run = copy_run(base, tmp_path / "run", names)
    (run / "subsets.zarr" / "membership" / "zarr.json").write_text("{not json")
    code, _, err = grasp("fit-surrogate", "-c", CONFIG, "--run", run)
    assert code == 2
    assert str(run / "subsets.zarr" / "membership") in one_line_error(err)


# ---------------------------------------------------------------- stale inputs


def test_changed_sketch_config_is_stale_unless_forced(base, tmp_path):
    run = copy_run(
        base,
        tmp_path / "run",
        ("corpus", "tasks", "reference", "sketches.zarr", "subsets.zarr", "retrain"),
    )
    changed = ["--set", "sketch.k=16", "--set", "surrogate.k_grid=[8, 16]"]
    code, _, err = grasp("fit-surrogate", "-c", CONFIG, "--run", run, *changed)
    assert code == 2
    line = one_line_error(err)
    assert line.startswith("error: stale:") and "sketch.k: 32 -> 16" in line
    assert not (run / "surrogate").exists()
    ok("fit-surrogate", "-c", CONFIG, "--run", run, *changed, "--force")
    assert (run / "surrogate" / "params.json").is_file()


def test_rebuilt_upstream_makes_downstream_stale(base, tmp_path):
    run = copy_run(base, tmp_path / "run", ALL_FIT)
    ok(
        "sketch", "-c", CONFIG, "--run", run, "--set", "sketch.kron_dim=2", "-q"
    )  # a different sketch
    code, _, err = grasp("score", "-c", CONFIG, "--run", run, "--set", "sketch.kron_dim=2")
    assert code == 2 and "stale:" in one_line_error(err) and "older sketches" in err


# ---------------------------------------------------------------- non-finite utilities


def _poison(part: Path, value: float) -> None:
    """A job whose training diverged: its part holds ``value`` and its recorded digest is the
    part's (as the job itself would have written it)."""
    from grasp_cli.artifacts.manifest import file_digest

    table = pq.read_table(part)
    values = np.full(table.num_rows, value)
    for name, column in (("value", values), ("utility", -values)):
        table = table.set_column(
            table.schema.get_field_index(name), name, pa.array(column, pa.float64())
        )
    pq.write_table(table, part)
    manifest_path = part.parent / "_grasp" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["extra"]["files"][part.name] = file_digest([part])
    manifest_path.write_text(json.dumps(manifest))


def test_nan_utilities_are_excluded_and_reported_up_to_the_limit(base, tmp_path):
    names = ("corpus", "tasks", "reference", "sketches.zarr", "subsets.zarr", "retrain")
    run = copy_run(base, tmp_path / "run", names)
    _poison(run / "retrain" / "part-000003.parquet", float("nan"))  # subset 3, base seed
    ok("fit-surrogate", "-c", CONFIG, "--run", run)  # 1 of 16 <= max_excluded_fraction 0.1
    params = json.loads((run / "surrogate" / "params.json").read_text())
    assert params["excluded_subsets"] == [3]
    assert params["n_fit"] + params["n_eval"] == N_SUBSETS - 1
    predictions = pq.read_table(run / "surrogate" / "predictions.parquet")
    assert 3 not in set(predictions.column("subset_id").to_pylist())

    code, _, err = grasp(
        "fit-surrogate", "-c", CONFIG, "--run", run, "--set", "surrogate.max_excluded_fraction=0"
    )
    assert code == 2
    line = one_line_error(err)
    assert "NaN or infinite" in line and str(run / "retrain") in line and "[3]" in line

    _poison(run / "retrain" / "part-000005.parquet", float("inf"))
    code, _, err = grasp("fit-surrogate", "-c", CONFIG, "--run", run)  # 2 of 16 > 1.6
    assert code == 2
    line = one_line_error(err)
    assert "2 subsets" in line and "max_excluded_fraction" in line


# ---------------------------------------------------------------- decodable but wrong bytes


@pytest.mark.parametrize("damage", ["deleted", "swapped"])
def test_missing_or_swapped_sketch_chunk_is_an_error_not_zeros(base, tmp_path, damage):
    run = copy_run(base, tmp_path / "run", ALL_FIT)
    chunk = run / "sketches.zarr" / "train" / "c" / "2" / "0"
    if damage == "deleted":
        chunk.unlink()
    else:
        shutil.copyfile(run / "sketches.zarr" / "train" / "c" / "3" / "0", chunk)
    for stage in ("fit-surrogate", "select", "score"):
        code, _, err = grasp(stage, "-c", CONFIG, "--run", run, "--force")
        assert code == 2, (stage, err)
        line = one_line_error(err)
        assert str(chunk) in line and "corrupt chunk" in line, line
        assert ("file missing" if damage == "deleted" else "not the data written") in line
    status = ok("status", "-c", CONFIG, "--run", run)
    sketch_line = next(line for line in status.splitlines() if line.strip().startswith("sketches"))
    assert "DAMAGED" in sketch_line and str(chunk) in sketch_line
    assert "corpus     ok" in status  # the rest of the run is still reported
    ok("sketch", "-c", CONFIG, "--run", run, "--force")  # the fix the message names works
    assert "sketches   ok" in ok("status", "-c", CONFIG, "--run", run)


def test_deleted_or_altered_retrain_part_is_named(base, tmp_path):
    run = copy_run(base, tmp_path / "run", ALL_FIT)
    part = sorted((run / "retrain").glob("part-*.parquet"))[4]
    part.unlink()
    code, _, err = grasp("fit-surrogate", "-c", CONFIG, "--run", run)
    assert code == 2 and f"{part}: missing" in one_line_error(err)
    shutil.copyfile(sorted((run / "retrain").glob("part-*.parquet"))[0], part)  # another job's rows
    code, _, err = grasp("fit-surrogate", "-c", CONFIG, "--run", run)
    assert code == 2 and f"{part}: changed since it was written" in one_line_error(err)
    assert "retrain    DAMAGED" in ok("status", "-c", CONFIG, "--run", run)


# ---------------------------------------------------------------- prepare commits corpus and tasks together


def test_prepare_killed_between_corpus_and_tasks_is_refused(base, tmp_path, monkeypatch):
    import grasp_cli.prepare.stage as prepare_stage

    run = copy_run(base, tmp_path / "run", ("corpus", "tasks"))
    original = prepare_stage.replace_dir
    calls = []

    def killed_after_corpus(src, dst):
        calls.append(dst)
        if Path(dst).name == "tasks":
            raise KeyboardInterrupt  # stands in for SIGKILL between the two swaps
        return original(src, dst)

    monkeypatch.setattr(prepare_stage, "replace_dir", killed_after_corpus)
    code, _, _ = grasp(
        "prepare", "-c", CONFIG, "--run", run, "--set", 'prepare.holdout_domains=["docs", "http"]'
    )
    assert code == 130 and [Path(c).name for c in calls] == ["corpus", "tasks"]
    monkeypatch.setattr(prepare_stage, "replace_dir", original)
    # the new corpus (docs + http held out) sits beside the old tasks (docs + email); asked with
    # the new corpus's own config, the pair check is what refuses
    new = ("--set", 'prepare.holdout_domains=["docs", "http"]')
    code, _, err = grasp("sketch", "-c", CONFIG, "--run", run, *new)
    assert code == 2 and "come from different `grasp prepare` runs" in one_line_error(err)
    assert "different `grasp prepare` runs" in ok("status", "-c", CONFIG, "--run", run, *new)
    ok("prepare", "-c", CONFIG, "--run", run)
    assert "corpus     ok" in ok("status", "-c", CONFIG, "--run", run)


# ---------------------------------------------------------------- a damaged manifest can be rebuilt


def test_truncated_manifest_is_rebuilt_by_its_stage_with_force(base, tmp_path):
    run = copy_run(base, tmp_path / "run", ALL_FIT)
    manifest = run / "retrain" / "_grasp" / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    for stage in ("fit-surrogate", "retrain-subsets"):
        code, _, err = grasp(stage, "-c", CONFIG, "--run", run)
        line = one_line_error(err)
        assert code == 2 and f"{manifest}: corrupt manifest" in line
        assert "rebuild it with `grasp retrain-subsets --force`" in line
    status = ok("status", "-c", CONFIG, "--run", run)
    assert "retrain    DAMAGED" in status and "sketches   ok" in status
    before = (run / "reference" / "model.pt").read_bytes()
    ok("retrain-subsets", "-c", CONFIG, "--run", run, "--force")
    assert (run / "reference" / "model.pt").read_bytes() == before  # θ0 is not retrained
    assert result_rows(run / "retrain") == result_rows(base / "retrain")
    ok("fit-surrogate", "-c", CONFIG, "--run", run)
    assert "DAMAGED" not in ok("status", "-c", CONFIG, "--run", run)


# ---------------------------------------------------------------- debris of killed writes


def test_each_stage_sweeps_its_own_debris_and_nothing_else(base, tmp_path):
    run = copy_run(base, tmp_path / "run", ALL_FIT)
    debris = {
        name: run / f".{name}.tmp-0123abcd"
        for name in ("reference", "surrogate", "selection", "report", "corpus", "tasks")
    }
    for path in debris.values():
        path.mkdir()
        (path / "half-written").write_text("x")
    (run / ".tasks.old-89abcdef").mkdir()
    foreign = [run / ".notes.tmp-0123abcd", run / "mine.tmp-0123abcd"]
    for path in foreign:
        path.write_text("the user's")
    ok("sketch", "-c", CONFIG, "--run", run, "--force")
    assert not debris["reference"].exists()
    ok("fit-surrogate", "-c", CONFIG, "--run", run)
    ok("select", "-c", CONFIG, "--run", run)
    ok("report", "-c", CONFIG, "--run", run)
    assert not any(debris[n].exists() for n in ("surrogate", "selection", "report"))
    ok("prepare", "-c", CONFIG, "--run", run)
    assert not debris["corpus"].exists() and not debris["tasks"].exists()
    assert not (run / ".tasks.old-89abcdef").exists()
    assert all(path.read_text() == "the user's" for path in foreign)


def test_prepare_into_a_folder_that_is_not_a_run_touches_nothing_of_it(tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir()
    theirs = [folder / ".cache.tmp-0123abcd", folder / ".x.old-89abcdef", folder / "data.csv"]
    for path in theirs:
        path.write_text("theirs")
    ok("prepare", "-c", CONFIG, "--run", folder)
    assert all(path.read_text() == "theirs" for path in theirs)
