"""Bad input through the real CLI: exit code 2 and one line that names the problem (and the file).

Each case builds a damaged copy of a small finished run (or a bad flag / config) and
checks the stage's answer: exit 2, a single ``error: ...`` line on stderr, no traceback,
and the words and path that tell the user what to fix. ``GRASP_DEBUG=1`` shows the
traceback instead. The last tests check that nothing in grasp can be made to execute a
pickle: checkpoints load with ``weights_only=True`` and no artifact is a pickle.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from tests.conftest import ENGLISH
from tests.conftest import run_grasp as grasp

CONFIG = Path(__file__).with_name("tiny.toml")
REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "grasp_cli"
ALL = ("corpus", "tasks", "reference", "sketches.zarr", "subsets.zarr", "retrain", "surrogate")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A finished tiny run up to fit-surrogate: what the damaged copies start from."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRASP_PROGRESS", "0")
        mp.delenv("GRASP_DEBUG", raising=False)
        root = tmp_path_factory.mktemp("bad") / "base"
        for stage in ("prepare", "sketch", "retrain-subsets", "fit-surrogate"):
            code, out, err = grasp(stage, "-c", CONFIG, "--run", root)
            assert code == 0, f"{stage}: {out}\n{err}"
        yield root


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("GRASP_PROGRESS", "0")
    monkeypatch.delenv("GRASP_DEBUG", raising=False)


# ---------------------------------------------------------------- the cases


@dataclass
class Case:
    """``setup(run, tmp)`` damages a copy of ``copies`` and returns the CLI args (after the stage)
    plus the substrings the one-line message must contain (``{run}``/``{tmp}`` are filled in)."""

    stage: list[str]
    expect: list[str]
    copies: tuple[str, ...] = ALL
    setup: Callable[[Path, Path], list[object]] = lambda run, tmp: []
    config: bool = True
    extra: list[object] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def _rewrite_corpus_part(run: Path, change: Callable[[pa.Table], pa.Table], part: int = 0) -> Path:
    path = run / "corpus" / f"part-{part:05d}.parquet"
    pq.write_table(change(pq.read_table(path)), path)
    return path


def _drop_tokens(run, tmp):
    _rewrite_corpus_part(run, lambda t: t.drop(["tokens"]))
    return []


def _tokens_as_strings(run, tmp):
    def change(table):
        text = pa.array(
            [" ".join(map(str, row)) for row in table.column("tokens").to_pylist()], pa.string()
        )
        return table.set_column(table.schema.get_field_index("tokens"), "tokens", text)

    _rewrite_corpus_part(run, change)
    return []


def _ragged_tokens(run, tmp):
    def change(table):
        rows = table.column("tokens").to_pylist()
        rows[3] = rows[3][:-5]
        return table.set_column(
            table.schema.get_field_index("tokens"), "tokens", pa.array(rows, pa.list_(pa.int32()))
        )

    _rewrite_corpus_part(run, change)
    return []


def _duplicate_ids(run, tmp):
    first = pq.read_table(run / "corpus" / "part-00000.parquet").column("id").to_pylist()

    def change(table):
        ids = table.column("id").to_pylist()
        ids[0] = first[7]
        return table.set_column(0, "id", pa.array(ids, pa.int64()))

    _rewrite_corpus_part(run, change, part=1)
    return []


def _empty_jsonl(run, tmp):
    path = tmp / "empty.jsonl"
    path.write_text("")
    return [path, "--holdout-domains", "empty"]


def _bad_json_line(run, tmp):
    path = tmp / "docs.jsonl"
    path.write_text(json.dumps({"text": ENGLISH, "domain": "a"}) + '\n{"text": oops}\n')
    return [path, "--holdout-domains", "a"]


def _shift_sketch_ids(run, tmp):
    """Sketches of another corpus, consistently written: ids shifted *and* digests updated
    (so this is the ids check at work, not the chunk digests)."""
    from grasp_cli.artifacts.zarr_io import chunk_digests

    ids = zarr.open_group(str(run / "sketches.zarr"), mode="r+")["train_ids"]
    ids[:] = np.asarray(ids[:]) + 1000
    path = run / "sketches.zarr" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["extra"]["digests"]["train_ids"] = chunk_digests(ids)
    path.write_text(json.dumps(manifest))
    return []


def _garbage_checkpoint(run, tmp):
    path = tmp / "garbage.pt"
    path.write_bytes(b"\x00this is not a checkpoint\xff" * 10)
    return ["--checkpoint", path]


def _other_model_checkpoint(run, tmp):
    state = torch.load(run.parent / "base" / "reference" / "model.pt", weights_only=True)
    name = next(k for k, v in state.items() if v.ndim == 2)
    state[name] = torch.zeros(state[name].shape[0] + 3, state[name].shape[1])
    path = tmp / "other.pt"
    torch.save(state, path)
    return ["--checkpoint", path]


def _truncated_checkpoint(run, tmp):
    data = (run.parent / "base" / "reference" / "model.pt").read_bytes()
    path = tmp / "cut.pt"
    path.write_bytes(data[: len(data) // 3])
    return ["--checkpoint", path]


def _list_checkpoint(run, tmp):
    path = tmp / "list.pt"
    torch.save([torch.zeros(3), torch.ones(2)], path)
    return ["--checkpoint", path]


def _given_unknown_ids(run, tmp):
    path = tmp / "given.parquet"
    pq.write_table(
        pa.table(
            {
                "subset_id": pa.array([0, 0, 1], pa.int64()),
                "id": pa.array([1, 99999, 2], pa.int64()),
            }
        ),
        path,
    )
    return [
        "--set",
        "subsets.designs={mixture = 12, within = 4, given = 2}",
        "--set",
        f"subsets.given={path}",
    ]


def _score_unknown_ids(run, tmp):
    path = tmp / "score_subsets.parquet"
    pq.write_table(
        pa.table(
            {"subset_id": pa.array([0, 0], pa.int64()), "id": pa.array([3, 123456], pa.int64())}
        ),
        path,
    )
    return ["--subsets", path]


def _score_subsets_no_columns(run, tmp):
    path = tmp / "score_subsets.parquet"
    pq.write_table(pa.table({"ids": pa.array([3, 4], pa.int64())}), path)
    return ["--subsets", path]


def _unknown_key_in_file(run, tmp):
    path = tmp / "bad.toml"
    path.write_text("[run]\nthreads = 1\n\n[select]\nbudget = 0.25\nbudgett = 3\n")
    return ["-c", path]


def _invalid_toml(run, tmp):
    path = tmp / "broken.toml"
    path.write_text("[sketch]\nk = = 3\n")
    return ["-c", path]


def _corrupt_manifest(run, tmp):
    (run / "sketches.zarr" / "manifest.json").write_text('{"artifact": "sketches", ')
    return []


def _corrupt_params(run, tmp):
    (run / "surrogate" / "params.json").write_text("{ nope")
    return []


def _docs(tmp: Path, name: str = "docs.jsonl", domain: str = "a", ids=None) -> Path:
    path = tmp / name
    rows = [{"text": ENGLISH * 3, "domain": domain} for _ in range(4)]
    for row, value in zip(rows, ids or [], strict=False):
        row["id"] = value
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _task_named(name):
    def setup(run, tmp):
        return [_docs(tmp), "--task", f"{name}={_docs(tmp, 't.jsonl', 't')}"]

    return setup


def _escaping_domain(run, tmp):
    return [_docs(tmp, domain="../../x"), "--holdout-domains", "../../x"]


def _corpus_file_as_task(run, tmp):
    corpus = _docs(tmp)
    return [corpus, _docs(tmp, "b.jsonl", "b"), "--task", f"t={corpus}", "--holdout-domains", "b"]


def _task_is_holdout_domain(run, tmp):
    return [_docs(tmp), "--holdout-domains", "a", "--task", f"a={_docs(tmp, 't.jsonl', 't')}"]


def _complete_as_string(run, tmp):
    path = run / "sketches.zarr" / "manifest.json"
    raw = json.loads(path.read_text())
    raw["complete"] = "false"
    path.write_text(json.dumps(raw))
    return []


def _run_is_a_file(run, tmp):
    shutil.rmtree(run)
    run.write_text("not a folder")
    return []


def _user_folder(run, tmp):
    folder = tmp / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    return ["--export", folder]


CASES: dict[str, Case] = {
    "corpus-missing-tokens": Case(["sketch"], ["needs a 'tokens' or an 'image' column", "{run}/corpus/part-00000.parquet"],
                                  ("corpus", "tasks"), _drop_tokens),
    "corpus-tokens-are-strings": Case(["sketch"], ["column 'tokens' has type string", "{run}/corpus/part-00000.parquet"],
                                      ("corpus", "tasks"), _tokens_as_strings),
    "corpus-ragged-tokens": Case(["retrain-subsets"], ["row 3: tokens has 28 entries, expected 33",
                                                       "{run}/corpus/part-00000.parquet"],
                                 ("corpus", "tasks"), _ragged_tokens),
    "corpus-duplicate-ids": Case(["sketch"], ["duplicate ids", "{run}/corpus"], ("corpus", "tasks"), _duplicate_ids),
    "prepare-empty-input": Case(["prepare"], ["{tmp}/empty.jsonl"], (), _empty_jsonl, config=False),
    "prepare-invalid-json-line": Case(["prepare"], ["{tmp}/docs.jsonl:2: invalid JSON"], (), _bad_json_line,
                                      config=False),
    "prepare-missing-input": Case(["prepare"], ["{tmp}/nowhere/*.jsonl: no input files found"], (),
                                  lambda run, tmp: [f"{tmp}/nowhere/*.jsonl"], config=False),
    "prepare-task-without-path": Case(["prepare"], ["--task 'mine': expected NAME=PATH"], (),
                                      lambda run, tmp: ["--demo", "--task", "mine"]),
    "prepare-unknown-holdout-domain": Case(["prepare"], ["no documents in domain 'klingon'"], (),
                                           lambda run, tmp: ["--demo", "--holdout-domains", "klingon"]),
    "sketch-ids-do-not-match-corpus": Case(["select"], ["sketch ids do not match", "{run}/sketches.zarr"],
                                           setup=_shift_sketch_ids),
    "sketch-ids-do-not-match-corpus-fit": Case(["fit-surrogate"], ["train_ids do not match", "{run}/sketches.zarr"],
                                               setup=_shift_sketch_ids),
    "k-grid-above-sketch-k": Case(["fit-surrogate"], ["surrogate.k_grid [8, 64] asks for more dims than sketch.k = 32"],
                                  extra=["--set", "surrogate.k_grid=[8, 64]"]),
    "k-grid-above-stored-sketch": Case(["fit-surrogate"], ["exceeds the sketch dimension k = 32", "{run}/sketches.zarr"],
                                       extra=["--set", "sketch.k=64", "--set", "surrogate.k_grid=[8, 64]", "--force"]),
    "budget-above-corpus-size": Case(["select"], ["asks for 1000 examples but the corpus has 96"],
                                     extra=["--budget", "1000"]),
    "unknown-task-weight": Case(["select"], ["select.task_weights names unknown task(s) ['nope']"],
                                extra=["--set", "select.task_weights={nope = 2.0}"]),
    "unknown-domain-cap": Case(["select"], ["select.domain_caps names unknown domains ['nowhere']"],
                               extra=["--set", "select.domain_caps={nowhere = 0.5}"]),
    "unreadable-checkpoint": Case(["sketch"], ["{tmp}/garbage.pt: unreadable checkpoint"], ("corpus", "tasks"),
                                  _garbage_checkpoint),
    "checkpoint-of-another-model": Case(["sketch"], ["{tmp}/other.pt: checkpoint does not fit the configured model",
                                                     "shape"], ("corpus", "tasks"), _other_model_checkpoint),
    "truncated-checkpoint": Case(["sketch"], ["{tmp}/cut.pt: unreadable checkpoint"],
                                 ("corpus", "tasks"), _truncated_checkpoint),
    "checkpoint-not-a-state-dict": Case(["sketch"], ["{tmp}/list.pt: not a state dict of tensors"],
                                        ("corpus", "tasks"), _list_checkpoint),
    "missing-checkpoint": Case(["sketch"], ["{tmp}/absent.pt: checkpoint not found"], ("corpus", "tasks"),
                               lambda run, tmp: ["--checkpoint", tmp / "absent.pt"]),
    "given-subsets-unknown-ids": Case(["retrain-subsets"], ["{tmp}/given.parquet", "not in the corpus", "99999"],
                                      ("corpus", "tasks", "reference"), _given_unknown_ids),
    "given-design-without-file": Case(["retrain-subsets"], ["subsets.given names no file"],
                                      ("corpus", "tasks", "reference"),
                                      extra=["--set", "subsets.designs={mixture = 12, given = 2}"]),
    "score-subsets-unknown-ids": Case(["score"], ["{tmp}/score_subsets.parquet", "not in the corpus", "123456"],
                                      setup=_score_unknown_ids),
    "score-subsets-missing-columns": Case(["score"], ["{tmp}/score_subsets.parquet", "missing column 'subset_id'"],
                                          setup=_score_subsets_no_columns),
    "unknown-config-key": Case(["sketch"], ["unknown key sketch.nope"], extra=["--set", "sketch.nope=1"]),
    "unknown-config-key-in-file": Case(["report"], ["{tmp}/bad.toml", "unknown key select.budgett"], config=False,
                                       setup=_unknown_key_in_file),
    "unknown-config-section": Case(["report"], ["unknown section [sketches]"], extra=["--set", "sketches.k=3"]),
    "wrong-config-type": Case(["sketch"], ["sketch.k: expected an integer, got 'abc'"], extra=["--set", "sketch.k='abc'"]),
    "config-choice": Case(["sketch"], ["sketch.projection = 'fft': choose one of"], extra=["--set", "sketch.projection=fft"]),
    "invalid-toml": Case(["sketch"], ["{tmp}/broken.toml: invalid TOML"], config=False, setup=_invalid_toml),
    "config-file-not-found": Case(["sketch"], ["config file not found: {tmp}/none.toml"], config=False,
                                  setup=lambda run, tmp: ["-c", tmp / "none.toml"]),
    "bad-set-syntax": Case(["sketch"], ["--set 'sketchk32': expected section.key=value"], extra=["--set", "sketchk32"]),
    "shard-out-of-range": Case(["sketch"], ["--shard 3 --num-shards 3: need 0 <= shard < num-shards"],
                               extra=["--shard", "3", "--num-shards", "3"]),
    "sketch-before-prepare": Case(["sketch"], ["run `grasp prepare` first"], ()),
    "fit-before-sketch": Case(["fit-surrogate"], ["{run}/sketches.zarr", "run `grasp sketch` first"], ("corpus", "tasks")),
    "select-before-fit": Case(["select"], ["{run}/surrogate", "run `grasp fit-surrogate` first"],
                              ("corpus", "tasks", "reference", "sketches.zarr")),
    "curation-before-select": Case(["retrain-subsets", "--curation"], ["run `grasp select` first"]),
    "corrupt-manifest": Case(["fit-surrogate"], ["{run}/sketches.zarr/manifest.json: corrupt manifest"],
                             setup=_corrupt_manifest),
    "corrupt-surrogate-params": Case(["select"], ["{run}/surrogate/params.json: unreadable"], setup=_corrupt_params),
    "task-name-escapes-the-run": Case(["prepare"], ["task name '../evil' cannot be a file name"], (),
                                      _task_named("../evil"), config=False),
    "task-name-is-absolute": Case(["prepare"], ["task name '/abs/victim' cannot be a file name"], (),
                                  _task_named("/abs/victim"), config=False),
    "task-name-has-a-folder": Case(["prepare"], ["task name 'a/b' cannot be a file name"], (),
                                   _task_named("a/b"), config=False),
    "holdout-domain-escapes-the-run": Case(["prepare"], ["'../../x' cannot be a file name"], (),
                                           _escaping_domain, config=False),
    "corpus-file-is-also-a-task": Case(["prepare"], ["docs.jsonl is also a corpus input", "target leakage"], (),
                                       _corpus_file_as_task, config=False),
    "task-name-is-a-holdout-domain": Case(["prepare"], ["task 'a' is given as a --task file and as a held-out domain"],
                                          (), _task_is_holdout_domain, config=False),
    "document-id-not-an-integer": Case(["prepare"], ["docs.jsonl:1: id 1.5 must be a string or an integer"], (),
                                       lambda run, tmp: [_docs(tmp, ids=[1.5]), "--holdout-domains", "a"],
                                       config=False),
    "document-ids-1-and-1.0-collide": Case(["prepare"], ["docs.jsonl:2: duplicate id '1'"], (),
                                           lambda run, tmp: [_docs(tmp, ids=[1, 1.0]), "--holdout-domains", "a"],
                                           config=False),
    "budget-nan": Case(["select"], ["select.budget = nan must be a finite count or fraction"],
                       extra=["--budget", "nan"]),
    "budget-inf": Case(["select"], ["select.budget = inf must be a finite count or fraction"],
                       extra=["--budget", "inf"]),
    "set-budget-nan": Case(["select"], ["select.budget = nan must be a finite"], extra=["--set", "select.budget=nan"]),
    "budget-one-and-a-half": Case(["select"], ["select.budget = 1.5 is neither a fraction in (0, 1] nor a whole count"],
                                  extra=["--budget", "1.5"]),
    "budget-not-a-number": Case(["select"], ["--budget 'lots': expected a count"], extra=["--budget", "lots"]),
    "slurm-task-id-not-an-integer": Case(["sketch"], ["SLURM_ARRAY_TASK_ID='abc' is not an integer"],
                                         env={"SLURM_ARRAY_TASK_ID": "abc"}),
    "negative-threads": Case(["sketch"], ["run.threads = -3 must be >= 0"], extra=["--set", "run.threads=-3"]),
    "holdout-fraction-above-one": Case(["prepare"], ["prepare.holdout_fraction = 1.5 must lie in (0, 1)"], (),
                                       extra=["--set", "prepare.holdout_fraction=1.5"]),
    "negative-design-count": Case(["retrain-subsets"], ["subsets.designs.mixture = -3 must be >= 0"],
                                  extra=["--set", "subsets.designs={mixture = -3}"]),
    "size-min-above-size-max": Case(["retrain-subsets"], ["subsets.size_min = 0.6 is above subsets.size_max = 0.5"],
                                    extra=["--set", "subsets.size_min=0.6"]),
    "task-weight-nan": Case(["select"], ["select.task_weights.docs = nan must be a finite number"],
                            extra=["--set", "select.task_weights={docs = nan}"]),
    "task-weights-all-zero": Case(["select"], ["gives every task weight 0"],
                                  extra=["--set", "select.task_weights={docs = 0.0, email = 0.0}"]),
    "manifest-complete-is-a-string": Case(["fit-surrogate"], ["{run}/sketches.zarr/manifest.json: corrupt manifest",
                                                              "field 'complete' is str"], setup=_complete_as_string),
    "run-is-a-file": Case(["status"], ["--run {run}: exists and is not a folder"], (), _run_is_a_file),
    "export-over-a-user-folder": Case(["select"], ["--export {tmp}/mine: exists and is not a grasp export"],
                                      setup=_user_folder),
    "export-over-the-run": Case(["select"], ["--export {run}: that folder holds the run"],
                                setup=lambda run, tmp: ["--export", run, "--force"]),
    "export-over-its-parent": Case(["select"], ["that folder holds the run"],
                                   setup=lambda run, tmp: ["--export", tmp, "--force"]),
    "export-into-an-artifact": Case(["select"], ["inside grasp's corpus artifact"],
                                    setup=lambda run, tmp: ["--export", run / "corpus" / "x", "--force"]),
    "export-onto-a-file": Case(["select"], ["exists and is not a folder"],
                               setup=lambda run, tmp: ["--export", _docs(tmp), "--force"]),
    "plugin-without-factory": Case(["sketch"], ["model.factory must be 'package.module:function'"],
                                   extra=["--set", "model.kind=plugin"]),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_line(base, tmp_path, name, monkeypatch):
    case = CASES[name]
    run = tmp_path / "run"
    run.mkdir()
    for artifact in case.copies:
        shutil.copytree(base / artifact, run / artifact)
    (tmp_path / "base").symlink_to(base)  # lets a setup read the intact originals
    args = case.setup(run, tmp_path)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    config = ["-c", CONFIG] if case.config else []
    code, out, err = grasp(*case.stage, *args, *config, "--run", run, *case.extra)
    assert code == 2, f"exit {code}\n{out}\n{err}"
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in case.expect:
        assert fragment.format(run=run, tmp=tmp_path) in lines[0], lines[0]


def test_there_are_at_least_twenty_distinct_cases():
    assert len(CASES) >= 20
    assert len({tuple(c.expect) for c in CASES.values()}) == len(CASES)


def test_unknown_flag_is_a_usage_error(base, tmp_path):
    code, _, err = grasp("sketch", "--run", tmp_path, "--no-such-flag")
    assert code == 2 and "No such option" in err and "Traceback" not in err


def test_grasp_debug_shows_the_traceback(tmp_path):
    command = [
        sys.executable,
        "-m",
        "grasp_cli.cli",
        "fit-surrogate",
        "--run",
        str(tmp_path / "empty"),
    ]
    env = {k: v for k, v in os.environ.items() if k != "GRASP_DEBUG"}
    env.update({"PYTHONPATH": str(REPO), "GRASP_PROGRESS": "0"})
    plain = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.startswith("error: missing:")
    debug = subprocess.run(
        command, env={**env, "GRASP_DEBUG": "1"}, capture_output=True, text=True, cwd=REPO
    )
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr and "InputError" in debug.stderr


# ---------------------------------------------------------------- no pickle can run


class Payload:
    """Unpickling this touches a file: proof that a loader executed code from a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickle_checkpoint_is_refused_not_executed(base, tmp_path):
    marker = tmp_path / "executed"
    evil = tmp_path / "evil.pt"
    state = torch.load(base / "reference" / "model.pt", weights_only=True)
    state["payload"] = Payload(marker)
    torch.save(state, evil)
    run = tmp_path / "run"
    for artifact in ("corpus", "tasks"):
        shutil.copytree(base / artifact, run / artifact)
    code, _, err = grasp("sketch", "-c", CONFIG, "--run", run, "--checkpoint", evil)
    assert code == 2 and f"{evil}: unreadable checkpoint" in err and "Traceback" not in err
    assert (
        "refused" in err
        and "Unsupported global" in err
        and "weights_only` set to `False" not in err
    )
    assert not marker.exists()
    assert not (run / "sketches.zarr").exists() and not (run / "reference").exists()
    torch.load(evil, weights_only=False)  # the payload is live: an unsafe loader would have run it
    assert marker.exists()


def _sources() -> dict[Path, str]:
    return {path: path.read_text(encoding="utf-8") for path in sorted(PACKAGE.rglob("*.py"))}


def test_checkpoints_load_with_weights_only():
    calls = [
        (p, m.group(0))
        for p, text in _sources().items()
        for m in re.finditer(r"torch\.load\([^)]*\)", text)
    ]
    assert calls, "grasp loads checkpoints somewhere"
    for path, call in calls:
        assert "weights_only=True" in call, f"{path}: {call}"


def test_no_pickle_in_artifacts():
    for path, text in _sources().items():
        assert not re.search(r"^\s*(import|from) (dill|joblib|cloudpickle)\b", text, re.M), path
        assert not re.search(r"pickle\.(loads?|dumps?)\(|Unpickler\(|Pickler\(", text), (
            path
        )  # pickle: only its error type
        for call in re.findall(r"np\.load\([^)]*\)", text):
            assert "allow_pickle=False" in call, f"{path}: {call}"
        assert "allow_pickle=True" not in text, path
        assert ".to_pickle(" not in text and "read_pickle(" not in text, path
    saves = [(p, text) for p, text in _sources().items() if "torch.save(" in text]
    assert [p.relative_to(PACKAGE).as_posix() for p, _ in saves] == ["reference.py"]
    # reference.py saves the state dict it checked to be all tensors, nothing else
    assert re.search(r"torch\.save\(state, buffer\)", saves[0][1])


def test_plugin_models_are_imported_only_by_the_model_factory():
    importers = [
        path.relative_to(PACKAGE).as_posix()
        for path, text in _sources().items()
        if re.search(r"import_module\(|__import__\(|(?<![.\w])(exec|eval)\(|runpy\.", text)
    ]
    assert importers == ["models/__init__.py"]


# ---------------------------------------------------------------- legitimate inputs that must work


def _prepare_rows(run: Path) -> int:
    return sum(pq.read_metadata(p).num_rows for p in (run / "corpus").glob("part-*.parquet"))


def _two_domains(tmp: Path) -> list[dict]:
    return [
        {"text": (ENGLISH if i % 2 else ENGLISH.upper()) * 3, "domain": "ab"[i % 2]}
        for i in range(8)
    ]


def test_jsonl_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.jsonl"
    lines = "\n".join(json.dumps(r) for r in _two_domains(tmp_path)) + "\n"
    path.write_bytes(b"\xef\xbb\xbf" + lines.encode())
    code, out, err = grasp("prepare", path, "--holdout-domains", "a", "--run", tmp_path / "run")
    assert code == 0, err
    assert _prepare_rows(tmp_path / "run") > 0


def test_null_ids_get_default_ids_and_dictionary_text_is_read(tmp_path):
    rows = _two_domains(tmp_path)
    table = pa.table(
        {
            "text": pa.array([r["text"] for r in rows]).dictionary_encode(),
            "domain": pa.array([r["domain"] for r in rows]),
            "id": pa.array([None] * len(rows), pa.int64()),
        }
    )
    assert pa.types.is_dictionary(table.schema.field("text").type)
    pq.write_table(table, tmp_path / "docs.parquet")
    code, _, err = grasp(
        "prepare", tmp_path / "docs.parquet", "--holdout-domains", "a", "--run", tmp_path / "run"
    )
    assert code == 0, err
    parts = sorted((tmp_path / "run" / "corpus").glob("part-*.parquet"))
    docs = {d for p in parts for d in pq.read_table(p).column("doc").to_pylist()}
    assert docs and all(d.startswith("docs-") for d in docs)


def test_a_glob_through_a_symlink_loop_reads_each_file_once(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in _two_domains(tmp_path)))
    (data / "loop").symlink_to(data, target_is_directory=True)
    once = tmp_path / "once"
    assert grasp("prepare", data / "docs.jsonl", "--holdout-domains", "a", "--run", once)[0] == 0
    for pattern in (f"{data}/**/*.jsonl", str(data)):
        run = tmp_path / f"run{len(pattern)}"
        code, _, err = grasp("prepare", pattern, "--holdout-domains", "a", "--run", run)
        assert code == 0, err
        assert _prepare_rows(run) == _prepare_rows(once)


def test_verbatim_task_documents_in_the_corpus_are_warned_about(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(r) for r in _two_domains(tmp_path)))
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"text": ENGLISH * 3}) + "\n")
    code, _, err = grasp("prepare", corpus, "--task", f"t={task}", "--run", tmp_path / "run")
    assert code == 0
    assert "1 of 1 documents of task 't' also appear verbatim in the corpus" in err


def test_a_full_disk_names_the_file_being_written(base, tmp_path, monkeypatch):
    import errno

    import grasp_cli.artifacts.tables as tables

    run = tmp_path / "run"
    for artifact in ALL:
        shutil.copytree(base / artifact, run / artifact)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tables.pq, "write_table", full)
    code, _, err = grasp("fit-surrogate", "-c", CONFIG, "--run", run, "--force")
    assert code == 1
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: {run}/surrogate/") and "No space left on device" in line, err
    assert not (run / "surrogate").exists() or (run / "surrogate" / "manifest.json").is_file()


# ---------------------------------------------------------------- select --export never destroys


def _select(run: Path, *args: object) -> tuple[int, str, str]:
    return grasp("select", "-c", CONFIG, "--run", run, *args)


def _export_ids(folder: Path) -> list[int]:
    return sorted(pq.read_table(folder, columns=["id"]).column("id").to_pylist())


def test_export_creates_replaces_its_own_and_never_deletes_user_files(base, tmp_path):
    run = tmp_path / "run"
    for artifact in ALL:
        shutil.copytree(base / artifact, run / artifact)
    export = tmp_path / "export"
    assert _select(run, "--export", export)[0] == 0
    selected = sorted(
        pq.read_table(run / "selection" / "selected.parquet").column("id").to_pylist()
    )
    parts = sorted(export.glob("part-*.parquet"))
    assert parts and (export / "_grasp_export.json").is_file()
    assert sorted(pq.read_table(parts[0]).column("id").to_pylist()) == selected
    # an earlier export is replaced (no --force needed), with a smaller budget
    assert _select(run, "--export", export, "--budget", "10")[0] == 0
    assert len(pq.read_table(sorted(export.glob("part-*.parquet"))[0])) == 10
    # a user's folder: refused, then --force adds beside the user's file, deleting nothing
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    code, _, err = _select(run, "--export", mine)
    assert code == 2 and (mine / "thesis.tex").read_text() == "precious"
    assert _select(run, "--export", mine, "--force")[0] == 0
    assert (mine / "thesis.tex").read_text() == "precious"
    assert (mine / "part-00000.parquet").is_file()
    # a second --force export there would overwrite the first's files: refused, nothing lost
    before = (mine / "part-00000.parquet").read_bytes()
    code, _, err = _select(run, "--export", mine, "--force")
    assert code == 2 and "already exists" in err
    assert (mine / "part-00000.parquet").read_bytes() == before
    # the run itself, with --force: refused and intact
    listing = sorted(p.name for p in run.iterdir())
    code, _, err = _select(run, "--export", run, "--force")
    assert code == 2 and sorted(p.name for p in run.iterdir()) == listing
