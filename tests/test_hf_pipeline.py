"""A Hugging Face checkpoint through the real CLI: prepare -> sketch -> retrain-subsets ->
fit-surrogate -> select, for GPT-2 (Conv1D) and Llama (nn.Linear, RoPE), on the tiny byte
corpus of tests/tiny.toml; θ0 is the checkpoint bit for bit; bad model inputs exit 2 with one
line naming the folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr
from safetensors.torch import load_file

from grasp_cli.artifacts.examples import read_examples, read_tasks
from grasp_cli.artifacts.layout import RunLayout
from grasp_cli.artifacts.manifest import file_digest
from grasp_cli.config import load_config
from grasp_cli.context import StageContext
from grasp_cli.reference import ensure_reference, new_bundle, stage_data_shape
from tests.conftest import grasp_ok
from tests.conftest import run_grasp as grasp
from tests.hf_checkpoints import ARCHITECTURES, save

CONFIG = Path(__file__).with_name("tiny.toml")
# tiny.toml trains its byte model's θ0 for 30 steps; -1 is the kind's default (0 for 'hf').
AUTO = "reference.steps=-1"


def hf_args(folder: Path, *more: str) -> list[str]:
    args = ["-c", str(CONFIG), "--set", "model.kind='hf'", "--set", f"model.path='{folder}'"]
    args += ["--set", AUTO]
    for item in more:
        args += ["--set", item]
    return args


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("GRASP_PROGRESS", "0")
    monkeypatch.delenv("GRASP_DEBUG", raising=False)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The tiny byte corpus, prepared once (model settings do not enter prepare)."""
    run = tmp_path_factory.mktemp("hf-prep") / "run"
    grasp_ok("prepare", "-c", CONFIG, "--run", run)
    return run


def copy_prepared(prepared: Path, run: Path) -> Path:
    for artifact in ("corpus", "tasks"):
        shutil.copytree(prepared / artifact, run / artifact)
    return run


def context(run: Path, folder: Path, *more: str) -> StageContext:
    overrides = ["model.kind='hf'", f"model.path='{folder}'", AUTO, *more]
    return StageContext(load_config(CONFIG, overrides), RunLayout(run), progress=False)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_whole_pipeline_runs_on_a_hugging_face_checkpoint(
    hf_checkpoints, prepared, tmp_path, arch
):
    folder = hf_checkpoints[arch]
    run = copy_prepared(prepared, tmp_path / "run")
    args = hf_args(folder)
    for stage in ("sketch", "retrain-subsets", "fit-surrogate"):
        grasp_ok(stage, *args, "--run", run)
    out = grasp_ok("select", *args, "--run", run)
    assert "24 of 96 examples" in out

    reference = json.loads((run / "reference" / "_grasp" / "manifest.json").read_text())
    assert reference["extra"]["source"] == "initial weights"
    assert reference["config"]["reference"]["steps"] == 0
    origin = reference["extra"]["origin"]
    assert origin["path"] == str(folder)
    assert origin["weights_digest"] == file_digest([folder / "model.safetensors"])
    assert origin["config_digest"] == file_digest([folder / "config.json"])
    assert not (run / "reference" / "model.pt").exists(), "the checkpoint is not copied"

    sketches = zarr.open_group(str(run / "sketches.zarr"), mode="r")
    train = np.asarray(sketches["train"][:])
    assert train.shape == (96, 32) and np.isfinite(train).all() and (np.abs(train).sum(1) > 0).all()
    described = sketches.attrs["sketch"]
    if arch == "gpt2":
        assert "transformer.h.0.attn.c_attn" in described["kron_transposed"]
    else:
        assert "model.layers.0.self_attn.q_proj" in described["kron_layers"]
    assert described["kron_layers"][-1] == "lm_head"

    retrain = [pq.read_table(p) for p in sorted((run / "retrain").glob("part-*.parquet"))]
    values = np.concatenate([t.column("value").to_numpy() for t in retrain])
    assert len(retrain) == 19 and np.isfinite(values).all()
    evaluation = pq.read_table(run / "surrogate" / "evaluation.parquet")
    assert "grasp" in set(evaluation.column("method").to_pylist())
    selected = pq.read_table(run / "selection" / "selected.parquet")
    assert selected.num_rows == 24

    status = grasp_ok("status", *args, "--run", run)
    assert "reference  ok" in status and "DAMAGED" not in status and "STALE" not in status


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_theta0_of_a_hugging_face_model_is_the_checkpoint_bit_for_bit(
    hf_checkpoints, prepared, tmp_path, arch
):
    folder = hf_checkpoints[arch]
    run = copy_prepared(prepared, tmp_path / "run")
    ctx = context(run, folder)
    corpus, tasks = read_examples(ctx.layout.corpus), read_tasks(ctx.layout.tasks)
    for attempt in ("made", "reused"):
        bundle = new_bundle(ctx, stage_data_shape(ctx, corpus, tasks))
        state = ensure_reference(ctx, corpus, bundle)
        saved = load_file(str(folder / "model.safetensors"))
        assert set(saved) <= set(state), attempt
        for key, value in saved.items():
            assert state[key].dtype == value.dtype and torch.equal(state[key], value), (
                attempt,
                key,
            )


def test_reference_steps_train_further_from_the_checkpoint(hf_checkpoints, prepared, tmp_path):
    folder = hf_checkpoints["llama"]
    run = copy_prepared(prepared, tmp_path / "run")
    ctx = context(run, folder, "reference.steps=3")
    corpus = read_examples(ctx.layout.corpus)
    bundle = new_bundle(ctx, stage_data_shape(ctx, corpus))
    state = ensure_reference(ctx, corpus, bundle)
    manifest = json.loads((run / "reference" / "_grasp" / "manifest.json").read_text())
    assert manifest["extra"]["source"] == "trained" and manifest["extra"]["steps"] == 3
    assert manifest["extra"]["origin"]["weights_digest"] == file_digest(
        [folder / "model.safetensors"]
    )
    saved = load_file(str(folder / "model.safetensors"))
    moved = [k for k, v in saved.items() if not torch.equal(state[k], v)]
    assert moved, "three AdamW steps change the weights"
    on_disk = torch.load(run / "reference" / "model.pt", weights_only=True)
    assert all(torch.equal(on_disk[k], state[k]) for k in saved)


def test_steps_zero_makes_the_seeded_init_theta0_for_built_in_models(prepared, tmp_path):
    run = copy_prepared(prepared, tmp_path / "run")
    ctx = StageContext(load_config(CONFIG, ["reference.steps=0"]), RunLayout(run), progress=False)
    corpus = read_examples(ctx.layout.corpus)
    bundle = new_bundle(ctx, stage_data_shape(ctx, corpus))
    fresh = {k: v.clone() for k, v in bundle.module.state_dict().items()}
    state = ensure_reference(ctx, corpus, bundle)
    assert all(torch.equal(state[k], fresh[k]) for k in fresh)
    manifest = json.loads((run / "reference" / "_grasp" / "manifest.json").read_text())
    assert (
        manifest["extra"]["source"] == "initial weights"
        and (run / "reference" / "model.pt").exists()
    )


def test_a_replaced_checkpoint_is_damage_and_makes_theta0_stale(prepared, tmp_path):
    folder = save("gpt2", tmp_path / "ckpt")
    run = copy_prepared(prepared, tmp_path / "run")
    args = hf_args(folder)
    grasp_ok("sketch", *args, "--run", run)
    before = np.asarray(zarr.open_group(str(run / "sketches.zarr"), mode="r")["train"][:])
    save("gpt2", folder, seed=1)  # other weights, same path
    status = grasp_ok("status", *args, "--run", run)
    assert f"reference  DAMAGED: the checkpoint {folder} changed" in status
    line = one_line_error("sketch", *args, "--run", run)  # θ0 is never rebuilt unless asked
    assert "changed since θ0 was recorded" in line and "grasp sketch --force" in line
    grasp_ok("sketch", *args, "--run", run, "--force")  # θ0 follows the checkpoint; sketches redone
    manifest = json.loads((run / "reference" / "_grasp" / "manifest.json").read_text())
    assert manifest["extra"]["origin"]["weights_digest"] == file_digest(
        [folder / "model.safetensors"]
    )
    after = np.asarray(zarr.open_group(str(run / "sketches.zarr"), mode="r")["train"][:])
    assert not np.allclose(before, after)
    assert "reference  ok" in grasp_ok("status", *args, "--run", run)


# ---------------------------------------------------------------- bad input: exit 2, one line


def one_line_error(*args: object) -> str:
    code, out, err = grasp(*args)
    assert code == 2, f"exit {code}\n{out}\n{err}"
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def max_corpus_token(run: Path) -> int:
    tokens = read_examples(run / "corpus").fields["tokens"]
    return int(tokens[tokens != 256].max())


def test_token_ids_outside_the_models_vocabulary(prepared, tmp_path):
    folder = save("gpt2", tmp_path / "small-vocab", vocab_size=100, pad_token_id=0)
    line = one_line_error("sketch", *hf_args(folder), "--run", prepared)
    largest = max_corpus_token(prepared)
    assert largest >= 100
    assert f"{folder}: the corpus has token id {largest}" in line and "100 ids" in line


def test_a_folder_without_weights(hf_checkpoints, prepared, tmp_path):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    shutil.copy(hf_checkpoints["gpt2"] / "config.json", folder)
    line = one_line_error("sketch", *hf_args(folder), "--run", prepared)
    assert f"{folder}: no weights (*.safetensors)" in line


def test_a_folder_with_pickle_weights_only(hf_checkpoints, prepared, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(hf_checkpoints["gpt2"] / "config.json", folder)
    torch.save({}, folder / "pytorch_model.bin")
    line = one_line_error("sketch", *hf_args(folder), "--run", prepared)
    assert f"{folder}: only pickle weights (pytorch_model.bin)" in line


def test_a_folder_without_config_json(hf_checkpoints, prepared, tmp_path):
    folder = tmp_path / "no-config"
    folder.mkdir()
    shutil.copy(hf_checkpoints["gpt2"] / "model.safetensors", folder)
    line = one_line_error("sketch", *hf_args(folder), "--run", prepared)
    assert f"{folder}: no config.json" in line


def test_weights_of_another_shape(hf_checkpoints, prepared, tmp_path):
    folder = save("gpt2", tmp_path / "wider", n_embd=32)
    shutil.copy(hf_checkpoints["gpt2"] / "model.safetensors", folder)  # weights of width 16
    line = one_line_error("sketch", *hf_args(folder), "--run", prepared)
    assert str(folder) in line


def test_model_path_missing(prepared, tmp_path):
    line = one_line_error("sketch", "-c", CONFIG, "--set", "model.kind='hf'", "--run", prepared)
    assert "model.kind = 'hf' needs model.path" in line
    absent = tmp_path / "absent"
    line = one_line_error("sketch", *hf_args(absent), "--run", prepared)
    assert f"{absent}: model folder not found (model.path)" in line


def test_a_factory_with_another_kind(prepared):
    line = one_line_error(
        "sketch",
        "-c",
        CONFIG,
        "--set",
        "model.factory='tests.plugin_model:make'",
        "--run",
        prepared,
    )
    assert "model.factory = 'tests.plugin_model:make' is set but model.kind = 'transformer'" in line


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        (["model.kind='transformer'", "model.path='x'"], "a model folder is loaded only with"),
        (["model.dtype='bfloat16'"], "model.dtype = 'bfloat16' needs model.kind = 'hf'"),
        (["model.options={width = 3}"], "model.options is set but model.kind = 'transformer'"),
        (["reference.steps=-2"], "reference.steps = -2 must be >= 0"),
    ],
)
def test_model_keys_that_would_be_ignored_are_errors(prepared, extra, expect):
    args = ["sketch", "-c", CONFIG, "--run", prepared]
    for item in extra:
        args += ["--set", item]
    assert expect in one_line_error(*args)


def test_parallel_models_with_a_hugging_face_model(hf_checkpoints, prepared):
    args = hf_args(hf_checkpoints["gpt2"], "retrain.parallel_models=2")
    assert "Hugging Face models do not support" in one_line_error(
        "retrain-subsets", *args, "--run", prepared
    )


def test_checkpoint_flag_with_a_folder(hf_checkpoints, prepared):
    folder = hf_checkpoints["gpt2"]
    line = one_line_error("sketch", "-c", CONFIG, "--run", prepared, "--checkpoint", folder)
    assert f"--checkpoint {folder}: a folder" in line and "model.kind = 'hf'" in line
