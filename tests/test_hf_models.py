"""Hugging Face models inside grasp: loading, losses with padding, and sketches against brute force.

Tiny GPT-2 (``Conv1D`` layers, tied ``lm_head``) and Llama (``nn.Linear``, RoPE) checkpoints
are built from configs with random weights (tests/hf_checkpoints.py). Every sketch is
checked against the explicit map applied to per-example gradients from one ordinary
backward per example, as in tests/test_sketch_math.py.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

from grasp_cli.config import SketchSection, load_config
from grasp_cli.errors import ConfigError, InputError
from grasp_cli.models import DataShape, ModelBundle, build_model
from grasp_cli.models.hf import hf_inputs
from grasp_cli.sketch import Sketcher
from grasp_cli.sketch.gradients import per_example_gradients
from tests.hf_checkpoints import ARCHITECTURES, save
from tests.test_sketch_math import assert_float32_close, tiny_lm

SEQ = 12
PAD = 256


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hf_bundle(folder, seq_len: int = SEQ, **keys) -> ModelBundle:
    overrides = ["model.kind='hf'", f"model.path='{folder}'"]
    for key, value in keys.items():
        if isinstance(value, dict):  # a TOML inline table
            value = "{" + ", ".join(f"{k} = {v!r}" for k, v in value.items()) + "}"
            overrides.append(f"model.{key}={value}")
        else:
            overrides.append(f"model.{key}={value!r}")
    config = load_config(None, overrides)
    return build_model(config.model, DataShape(seq_len=seq_len, max_token_id=255), seed=0)


def tokens(
    n: int, seed: int = 0, pad_from: dict[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """Random byte rows ``[n, SEQ+1]``; row r is padded from position ``pad_from[r]`` on."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, 256, (n, SEQ + 1), generator=gen)
    for row, start in (pad_from or {}).items():
        rows[row, start:] = PAD
    return {"tokens": rows}


def per_example_flat(bundle: ModelBundle, batch, names: list[str], transposed: set[str]):
    """Brute force: one backward per example; gradients flattened in ``names`` order, ``[B, D]``.

    A name in ``transposed`` (a Conv1D weight, stored ``[d_in, d_out]``) is flattened as its
    transpose, the layout of the equivalent ``nn.Linear`` the Kronecker map acts on.
    """
    params = dict(bundle.module.named_parameters(remove_duplicate=False))
    rows = []
    for i in range(batch["tokens"].shape[0]):
        single = {"tokens": batch["tokens"][i : i + 1]}
        grads = torch.autograd.grad(bundle.loss(single).sum(), [params[n] for n in names])
        flat = [
            (g.T if n in transposed else g).reshape(-1) for n, g in zip(names, grads, strict=True)
        ]
        rows.append(torch.cat(flat))
    return torch.stack(rows)


def explicit_matrix(sketcher: Sketcher) -> tuple[torch.Tensor, list[str]]:
    """The sketcher's map ``[k, D]`` (Kronecker blocks act on ``[d_out, d_in(+1)]`` gradients)."""
    params = dict(sketcher.bundle.module.named_parameters())
    blocks, order = [], []
    for site in sketcher.sites:
        p_out, p_in = sketcher.kronecker.factors(
            site.module, site.d_out, site.d_in + (site.bias is not None)
        )
        full = sketcher.kronecker.final_map(site.module) @ torch.kron(p_out, p_in)
        full = full.reshape(sketcher.k, site.d_out, -1)
        blocks.append(full[:, :, : site.d_in].reshape(sketcher.k, -1))
        order.append(site.weight)
        if site.bias is not None:
            blocks.append(full[:, :, site.d_in])
            order.append(site.bias)
    for name in sketcher.dense_names:
        blocks.append(sketcher.projector.matrix(name, params[name].numel()))
        order.append(name)
    return torch.cat(blocks, dim=1), order


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_bundle_holds_the_saved_weights_bit_for_bit(hf_checkpoints, arch):
    folder = hf_checkpoints[arch]
    bundle = hf_bundle(folder)
    saved = load_file(str(folder / "model.safetensors"))
    state = bundle.module.state_dict()
    assert saved, "the checkpoint has weights"
    for key, value in saved.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    assert bundle.per_example == "loop" and bundle.vocab_size == 257
    assert not bundle.module.training
    if arch == "gpt2":  # tied: the head is the embedding, not a fresh matrix
        assert "lm_head.weight" not in saved
        assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()


def test_bfloat16_loads_the_checkpoint_cast_once(hf_checkpoints):
    folder = hf_checkpoints["llama"]
    bundle = hf_bundle(folder, dtype="bfloat16")
    saved = load_file(str(folder / "model.safetensors"))
    for key, value in saved.items():
        assert torch.equal(bundle.module.state_dict()[key], value.to(torch.bfloat16)), key
    loss = bundle.loss(tokens(2))
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()


def test_options_override_config_json_and_unknown_ones_are_errors(hf_checkpoints):
    bundle = hf_bundle(hf_checkpoints["gpt2"], options={"resid_pdrop": 0.25})
    assert bundle.module.config.resid_pdrop == 0.25
    with pytest.raises(ConfigError, match="model.options.no_such_key: .*config.json has no"):
        hf_bundle(hf_checkpoints["gpt2"], options={"no_such_key": 1})


def test_weights_that_do_not_cover_the_model_are_refused(tmp_path):
    folder = save("llama", tmp_path / "partial")
    weights = load_file(str(folder / "model.safetensors"))
    from safetensors.torch import save_file

    weights.pop("model.norm.weight")  # transformers would silently re-initialize it
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"do not match config.json \(missing .*model.norm.weight"):
        hf_bundle(folder)


def test_rows_longer_than_the_models_positions_are_refused(tmp_path):
    folder = save("gpt2", tmp_path / "short", n_positions=8)
    with pytest.raises(InputError, match="at most 8 positions"):
        hf_bundle(folder, seq_len=SEQ)


# ---------------------------------------------------------------- losses


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_loss_is_the_mean_over_non_pad_targets(hf_checkpoints, arch):
    bundle = hf_bundle(hf_checkpoints[arch])
    batch = tokens(3, pad_from={1: 7, 2: 1})
    losses = bundle.loss(batch)
    # row 1 counts its first 6 targets: the loss of the truncated row, computed without padding
    short = bundle.loss({"tokens": batch["tokens"][1:2, :7]})
    torch.testing.assert_close(losses[1], short[0], atol=1e-5, rtol=1e-5)
    assert losses[2] == 0  # nothing but padding after the first token
    inputs = hf_inputs(batch, PAD)
    assert inputs["attention_mask"][1].tolist() == [1] * 7 + [0] * (SEQ - 7)
    assert int(inputs["input_ids"].max()) < 256  # pad is fed as id 0, never as itself
    # the same numbers by hand from the logits
    logits = bundle.module(**inputs).logits
    target = batch["tokens"][0, 1:]
    manual = torch.nn.functional.cross_entropy(logits[0], target)
    torch.testing.assert_close(losses[0], manual, atol=1e-6, rtol=1e-6)


def test_a_pad_id_outside_the_vocabulary_works(hf_checkpoints):
    config = load_config(None, ["model.kind='hf'", f"model.path='{hf_checkpoints['llama']}'"])
    bundle = build_model(config.model, DataShape(seq_len=SEQ, pad_id=5000), seed=0)
    batch = tokens(2)
    padded = batch["tokens"].clone()
    padded[0, 8:] = 5000
    losses = bundle.loss({"tokens": padded})
    short = bundle.loss({"tokens": batch["tokens"][:1, :8]})
    torch.testing.assert_close(losses[0], short[0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- Conv1D sketches


class Regression(nn.Module):
    """One linear map (``Conv1D`` or ``nn.Linear``) on ``x [B, T, 4]`` -> ``[B, T, 5]``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.layer(x))


def regression_bundle(layer: nn.Module) -> ModelBundle:
    def loss(outputs, batch):
        return ((outputs - batch["y"]) ** 2).sum(dim=(1, 2))

    return ModelBundle(Regression(layer), lambda batch: (batch["x"],), loss, kind="classifier")


def conv1d_and_linear() -> tuple[Conv1D, nn.Linear]:
    torch.manual_seed(3)
    conv = Conv1D(5, 4)  # nf = 5 outputs, nx = 4 inputs: weight [4, 5]
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    linear = nn.Linear(4, 5)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    return conv, linear


def regression_batch(n: int = 6) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {"x": torch.randn(n, 3, 4, generator=gen), "y": torch.randn(n, 3, 5, generator=gen)}


def test_conv1d_kronecker_sketch_projects_each_examples_explicit_weight_gradient():
    conv, _ = conv1d_and_linear()
    bundle = regression_bundle(conv)
    batch = regression_batch()
    sketcher = Sketcher(bundle, SketchSection(projection="kronecker", k=24, kron_dim=3), seed=5)
    (site,) = sketcher.sites
    assert (site.module, site.d_in, site.d_out, site.transposed) == ("layer", 4, 5, True)
    expected = []
    for i in range(6):
        single = {key: value[i : i + 1] for key, value in batch.items()}
        weight, bias = torch.autograd.grad(bundle.loss(single).sum(), [conv.weight, conv.bias])
        assert weight.shape == (4, 5)  # [d_in, d_out]: the stored layout
        gradient = {"layer.weight": weight, "layer.bias": bias}
        expected.append(sketcher.project_gradient(gradient))
        # by hand: the equivalent nn.Linear's [d_out, d_in | bias] gradient through P
        matrix = torch.cat([weight.T, bias[:, None]], dim=1)
        by_hand = sketcher.kronecker.project_gradient("layer", matrix).numpy()
        assert_float32_close(expected[-1], by_hand)
    assert_float32_close(sketcher.sketch_batch(batch), np.stack(expected))


def test_conv1d_and_the_equivalent_linear_have_the_same_sketch_and_residual():
    conv, linear = conv1d_and_linear()
    batch = regression_batch()
    section = SketchSection(projection="kronecker", k=16, kron_dim=4)
    from_conv = Sketcher(regression_bundle(conv), section, seed=2)
    from_linear = Sketcher(regression_bundle(linear), section, seed=2)
    assert_float32_close(from_conv.sketch_batch(batch), from_linear.sketch_batch(batch))
    assert_float32_close(from_conv.task_residual([batch]), from_linear.task_residual([batch]))


# ---------------------------------------------------------------- whole models


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_kronecker_sketch_of_a_whole_model_is_explicit_map_times_gradients(arch, tmp_path):
    folder = save(arch, tmp_path / arch, tie_word_embeddings=False)
    bundle = hf_bundle(folder)
    batch = tokens(4, seed=2, pad_from={3: 9})
    sketcher = Sketcher(bundle, SketchSection(projection="kronecker", k=40, kron_dim=3), seed=1)
    layers = [site.module for site in sketcher.sites]
    if arch == "gpt2":
        assert layers[:4] == [
            "transformer.h.0.attn.c_attn",
            "transformer.h.0.attn.c_proj",
            "transformer.h.0.mlp.c_fc",
            "transformer.h.0.mlp.c_proj",
        ]
        assert sketcher.describe()["kron_transposed"] == layers[:-1]  # all but lm_head
    else:
        assert (
            "model.layers.1.self_attn.q_proj" in layers and "model.layers.0.mlp.down_proj" in layers
        )
        assert sketcher.describe()["kron_transposed"] == []
    assert layers[-1] == "lm_head" and len(layers) == (9 if arch == "gpt2" else 15)
    matrix, order = explicit_matrix(sketcher)
    transposed = {site.weight for site in sketcher.sites if site.transposed}
    grads = per_example_flat(bundle, batch, order, transposed)
    assert_float32_close(sketcher.sketch_batch(batch), (grads @ matrix.T).numpy())
    residual = sketcher.task_residual(
        [{"tokens": batch["tokens"][:3]}, {"tokens": batch["tokens"][3:]}]
    )
    assert_float32_close(residual, -(matrix @ grads.mean(0)).numpy())


def test_a_tied_output_map_is_sketched_with_its_own_share_of_the_gradient(hf_checkpoints):
    bundle = hf_bundle(hf_checkpoints["gpt2"])
    untied = copy.deepcopy(bundle)
    head = untied.module.lm_head
    head.weight = nn.Parameter(untied.module.transformer.wte.weight.detach().clone())
    batch = tokens(3, seed=4)
    section = SketchSection(projection="kronecker", k=32, kron_dim=4)
    tied_sketcher = Sketcher(bundle, section, seed=3)
    assert "lm_head.weight" in tied_sketcher.param_names
    assert tied_sketcher.num_params() == Sketcher(untied, section, seed=3).num_params()
    assert_float32_close(
        tied_sketcher.sketch_batch(batch), Sketcher(untied, section, seed=3).sketch_batch(batch)
    )
    with pytest.raises(ConfigError, match="one tied tensor"):
        Sketcher(
            bundle,
            SketchSection(
                projection="kronecker", params=["transformer.wte.weight", "lm_head.weight"]
            ),
            seed=0,
        )


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_dense_projection_of_selected_parameters_uses_looped_per_example_gradients(
    hf_checkpoints, arch
):
    bundle = hf_bundle(hf_checkpoints[arch])
    pattern = "transformer.h.1" if arch == "gpt2" else "model.layers.1"
    section = SketchSection(
        projection="gaussian", k=32, modules=[pattern], params=["lm_head.weight"]
    )
    sketcher = Sketcher(bundle, section, seed=6)
    assert all(n.startswith(pattern) for n in sketcher.dense_names[:-1])
    canonical_head = "transformer.wte.weight" if arch == "gpt2" else "lm_head.weight"
    assert sketcher.dense_names[-1] == canonical_head  # a tied alias is folded into its tensor
    batch = tokens(3, seed=5, pad_from={0: 4})
    matrix, order = explicit_matrix(sketcher)
    grads = per_example_flat(bundle, batch, order, set())
    assert_float32_close(sketcher.sketch_batch(batch), (grads @ matrix.T).numpy())
    assert_float32_close(sketcher.task_residual([batch]), -(matrix @ grads.mean(0)).numpy())


def test_looped_per_example_gradients_equal_vmapped_ones():
    bundle = tiny_lm()
    batch = {"tokens": torch.randint(0, 256, (5, 9), generator=torch.Generator().manual_seed(0))}
    names = [n for n, _ in bundle.module.named_parameters()]
    vmapped = per_example_gradients(bundle, names, batch, method="vmap")
    looped = per_example_gradients(bundle, names, batch, method="loop")
    for name in names:
        torch.testing.assert_close(looped[name], vmapped[name], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- module patterns


def sites_of(bundle: ModelBundle, **keys) -> list[str]:
    sketcher = Sketcher(
        bundle, SketchSection(projection="kronecker", k=8, kron_dim=2, **keys), seed=0
    )
    return [site.module for site in sketcher.sites]


def test_module_patterns_choose_linear_maps_by_name_ancestors_and_exclusions(hf_checkpoints):
    bundle = hf_bundle(hf_checkpoints["gpt2"])
    block0 = [
        f"transformer.h.0.{p}" for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert sites_of(bundle, modules=["transformer.h.0"]) == block0  # an ancestor's name
    assert sites_of(bundle, modules=["*.attn.*"], exclude_modules=["*.c_proj"]) == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.1.attn.c_attn",
    ]
    everything = sites_of(bundle)
    assert sites_of(bundle, exclude_modules=["lm_head"]) == everything[:-1]
    assert sites_of(bundle, exclude_modules=["transformer.h.1"]) == block0 + ["lm_head"]
    # params add to modules: a linear map named by a parameter joins, other parameters go dense
    sketcher = Sketcher(
        bundle,
        SketchSection(
            projection="kronecker",
            k=8,
            kron_dim=2,
            modules=["transformer.h.0.mlp.c_fc"],
            params=["transformer.h.1.mlp.c_fc.weight", "transformer.ln_f.*"],
        ),
        seed=0,
    )
    assert [s.module for s in sketcher.sites] == [
        "transformer.h.0.mlp.c_fc",
        "transformer.h.1.mlp.c_fc",
    ]
    assert [s.bias is not None for s in sketcher.sites] == [True, False]
    assert sketcher.dense_names == ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    # dense kinds take every parameter under a chosen module
    dense = Sketcher(
        bundle,
        SketchSection(
            projection="gaussian",
            k=8,
            modules=["transformer.h.1.mlp"],
            exclude_modules=["*.c_proj"],
        ),
        seed=0,
    )
    assert dense.dense_names == ["transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.bias"]


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            {"modules": ["transformer.h.7*"]},
            "sketch.modules: 'transformer.h.7\\*' matches no module",
        ),
        ({"exclude_modules": ["head"]}, "sketch.exclude_modules: 'head' matches no module"),
        ({"modules": ["transformer.ln_f"]}, "chooses no linear map"),
        ({"params": ["nope.*"]}, "matches no parameter"),
    ],
)
def test_patterns_that_choose_nothing_are_config_errors(hf_checkpoints, keys, message):
    with pytest.raises(ConfigError, match=message):
        sites_of(hf_bundle(hf_checkpoints["gpt2"]), **keys)


def test_module_patterns_work_on_the_built_in_transformer_too():
    bundle = tiny_lm()
    assert sites_of(bundle, modules=["blocks.*.attn"]) == [
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
    ]
    assert sites_of(bundle, exclude_modules=["blocks"]) == ["lm_head"]
