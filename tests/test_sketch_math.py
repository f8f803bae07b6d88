"""The sketch stage's math against brute force on a tiny model.

JL bounds used below. For a linear map M with E[MᵀM] = I, write v for a bound on the
relative variance of squared norms: Var ‖Mg‖² ≤ v ‖g‖⁴ for every g. By polarization,
the error e_ij = <Mg_i, Mg_j> − <g_i, g_j> then has standard deviation at most
sqrt(v) (‖g_i‖² + ‖g_j‖²) / 2, so z_ij = e_ij / (sqrt(v) (‖g_i‖² + ‖g_j‖²) / 2) has sd ≤ 1
for every pair, whatever the gradients. Values of v:

- Gaussian: exactly 2/k. Rademacher: 2/k − (2/k) Σ g⁴/‖g‖⁴ ≤ 2/k.
- SJLT (nnz bands, each a CountSketch of width w): (2 / (nnz · w)) (1 − Σ g⁴/‖g‖⁴) ≤ 2 / (nnz · min w).
- Kronecker: for P_out, P_in with N(0, 1/kd) entries, E‖P_out X P_inᵀ‖⁴ ≤ (1 + 2/kd)² ‖X‖⁴
  (apply the Gaussian bound to each factor in turn), so v_K = (1 + 2/kd)² − 1; layers are
  independent blocks, and the final Gaussian map adds (2/k)(1 + v_K): v = v_K + (2/k)(1 + v_K).

JL errors are sub-exponential, so |z| > 6 has probability far below 1e-4 per pair; we
require max |z| ≤ 6 for one seed, and the mean of z over S seeds within 5 / sqrt(S) (its sd
is ≤ 1/sqrt(S)), which catches a wrong scale of a few percent (dense kinds) that a
single-seed bound would miss.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from grasp_cli.config import ModelSection, SketchSection
from grasp_cli.errors import ConfigError
from grasp_cli.models import DataShape, ModelBundle, build_model
from grasp_cli.sketch import Sketcher, take_prefix
from grasp_cli.sketch.gradients import linear_signals, linear_sites, per_example_gradients

SEQ = 8


def assert_float32_close(actual, expected, rtol: float = 1e-4) -> None:
    """Float32 sketches from two code paths (vmap vs loop, batch of 3 vs 8) agree to rounding:
    relative error ~1e-6 per element, but an element near 0 is a sum whose rounding error
    scales with the *array's* magnitude, so the absolute tolerance is relative to that."""
    expected = np.asarray(expected)
    scale = float(np.abs(expected).max()) or 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=1e-5 * scale)


def tiny_lm(seed: int = 0) -> ModelBundle:
    """1-layer, width-16 byte LM with weights perturbed away from init so every layer has gradient."""
    bundle = build_model(
        ModelSection(n_layer=1, n_head=2, d_model=16), DataShape(seq_len=SEQ), seed
    )
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in bundle.module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    bundle.module.eval()
    return bundle


def tiny_mlp() -> ModelBundle:
    return build_model(
        ModelSection(kind="mlp", hidden=8), DataShape(image_shape=(4, 4), num_classes=3), 0
    )


def tokens(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"tokens": torch.randint(0, 256, (n, SEQ + 1), generator=gen)}


def images(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randint(0, 256, (n, 4, 4), generator=gen, dtype=torch.uint8),
        "label": torch.randint(0, 3, (n,), generator=gen),
    }


def loop_gradients(
    bundle: ModelBundle, batch: dict[str, torch.Tensor], names: list[str]
) -> torch.Tensor:
    """Brute force: one ordinary backward per example; ``[B, D]`` flattened in ``names`` order."""
    params = dict(bundle.module.named_parameters())
    rows = []
    size = next(iter(batch.values())).shape[0]
    for i in range(size):
        single = {key: value[i : i + 1] for key, value in batch.items()}
        grads = torch.autograd.grad(bundle.loss(single).sum(), [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def section(kind: str, k: int = 128, **kw) -> SketchSection:
    return SketchSection(projection=kind, k=k, **kw)


def explicit_matrix(sketcher: Sketcher) -> tuple[torch.Tensor, list[str]]:
    """The sketcher's whole map ``M [k, D]`` materialized, and the parameter order of its columns.

    Kronecker layers contribute ``Q_layer · (P_out ⊗ P_in)`` acting on the row-major
    ``[d_out, d_in(+1)]`` gradient (bias as the last column); other parameters their dense slab.
    """
    params = dict(sketcher.bundle.module.named_parameters())
    blocks, order = [], []
    for site in sketcher.sites:
        p_out, p_in = sketcher.kronecker.factors(
            site.module, site.d_out, site.d_in + (site.bias is not None)
        )
        # [k, d_out * (d_in + 1)]: the final map times P_out ⊗ P_in
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


def jl_variance(kind: str, k: int, kron_dim: int = 16, nnz: int = 4) -> float:
    if kind in ("gaussian", "rademacher"):
        return 2.0 / k
    if kind == "sjlt":
        return 2.0 / (nnz * (k // nnz))
    v_kron = (1 + 2 / kron_dim) ** 2 - 1
    return v_kron + (2 / k) * (1 + v_kron)


def standardized_errors(phi: np.ndarray, grads: torch.Tensor, v: float) -> np.ndarray:
    exact = (grads.double() @ grads.double().T).numpy()
    approx = phi.astype(np.float64) @ phi.astype(np.float64).T
    sq = np.diag(exact)
    scale = math.sqrt(v) * (sq[:, None] + sq[None, :]) / 2
    upper = np.triu_indices(len(sq))
    return ((approx - exact) / scale)[upper]


# ---------------------------------------------------------------- gradients


def test_batched_per_example_gradients_equal_a_loop():
    bundle = tiny_lm()
    batch = tokens(6)
    names = [n for n, _ in bundle.module.named_parameters()]
    batched = per_example_gradients(bundle, names, batch)
    flat = torch.cat([batched[n].reshape(6, -1) for n in names], dim=1)
    torch.testing.assert_close(flat, loop_gradients(bundle, batch, names), atol=1e-5, rtol=1e-5)


def test_captured_linear_signals_rebuild_each_examples_weight_gradient():
    bundle = tiny_lm()
    batch = tokens(5)
    names = [n for n, _ in bundle.module.named_parameters()]
    sites = linear_sites(bundle.module, names)
    signals = linear_signals(bundle, sites, batch)
    assert all(p.requires_grad for p in bundle.module.parameters()), "flags must be restored"
    assert all(p.grad is None for p in bundle.module.parameters()), "no weight gradient computed"
    for site in sites:
        ((x, delta),) = signals[site.module]
        weight_grads = torch.einsum("bto,bti->boi", delta, x)
        expected = loop_gradients(bundle, batch, [site.weight]).reshape(5, site.d_out, site.d_in)
        torch.testing.assert_close(weight_grads, expected, atol=1e-5, rtol=1e-5)
        if site.bias is not None:
            expected_bias = loop_gradients(bundle, batch, [site.bias])
            torch.testing.assert_close(delta.sum(1), expected_bias, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- exact structure


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "sjlt"])
def test_dense_and_sparse_sketch_is_explicit_matrix_times_gradient(kind):
    bundle = tiny_lm()
    batch = tokens(4)
    sketcher = Sketcher(bundle, section(kind, k=64), seed=11)
    matrix, order = explicit_matrix(sketcher)
    expected = loop_gradients(bundle, batch, order) @ matrix.T
    assert_float32_close(sketcher.sketch_batch(batch), expected.numpy())
    if kind == "sjlt":  # nnz non-zeros per column, each ±1/sqrt(nnz), in distinct rows
        nonzero = matrix != 0
        assert torch.all(nonzero.sum(0) == 4)
        torch.testing.assert_close(matrix[nonzero].abs(), torch.full((int(nonzero.sum()),), 0.5))


def test_kronecker_equals_final_map_times_blockdiag_kron_on_materialized_gradients():
    bundle = tiny_lm()
    batch = tokens(4)
    globs = ["blocks.0.attn.*", "blocks.0.fc.weight", "ln_f.weight", "tok_emb.weight"]
    sketcher = Sketcher(bundle, section("kronecker", k=48, kron_dim=5, params=globs), seed=2)
    assert [s.module for s in sketcher.sites] == [
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
        "blocks.0.fc",
    ]
    assert [s.bias is not None for s in sketcher.sites] == [True, True, False]
    assert sketcher.dense_names == ["tok_emb.weight", "ln_f.weight"]  # fall back to dense Gaussian
    matrix, order = explicit_matrix(sketcher)
    expected = loop_gradients(bundle, batch, order) @ matrix.T
    assert_float32_close(sketcher.sketch_batch(batch), expected.numpy())


def test_kronecker_on_an_mlp_with_two_dimensional_linear_inputs():
    bundle = tiny_mlp()
    batch = images(5)
    sketcher = Sketcher(bundle, section("kronecker", k=32, kron_dim=4), seed=0)
    assert sketcher.param_names == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert sketcher.dense_names == []
    matrix, order = explicit_matrix(sketcher)
    expected = loop_gradients(bundle, batch, order) @ matrix.T
    assert_float32_close(sketcher.sketch_batch(batch), expected.numpy())


def test_kronecker_with_empty_globs_sketches_exactly_the_linear_layers():
    sketcher = Sketcher(tiny_lm(), section("kronecker"), seed=0)
    linear = [
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
        "blocks.0.fc",
        "blocks.0.fc_proj",
        "lm_head",
    ]
    assert sketcher.describe()["kron_layers"] == linear
    assert sketcher.dense_names == []
    assert "tok_emb.weight" not in sketcher.param_names and "lm_head.weight" in sketcher.param_names


# ---------------------------------------------------------------- JL accuracy


@pytest.mark.parametrize(
    ("kind", "k", "seeds"),
    [("gaussian", 512, 6), ("rademacher", 512, 6), ("sjlt", 512, 6), ("kronecker", 512, 16)],
)
def test_sketched_inner_products_approximate_exact_ones_within_jl_bound(kind, k, seeds):
    bundle = tiny_lm()
    batch = tokens(10, seed=3)
    kron_dim = 32
    z_sum = 0.0
    for seed in range(seeds):
        sketcher = Sketcher(bundle, section(kind, k=k, kron_dim=kron_dim), seed=seed)
        if seed == 0:
            _, order = explicit_matrix(sketcher)
            grads = loop_gradients(bundle, batch, order)
        z = standardized_errors(sketcher.sketch_batch(batch), grads, jl_variance(kind, k, kron_dim))
        assert np.abs(z).max() <= 6.0, f"seed {seed}: worst pair at {np.abs(z).max():.1f} sd"
        z_sum = z_sum + z
    z_mean = z_sum / seeds
    assert np.abs(z_mean).max() <= 5.0 / math.sqrt(seeds), (
        f"bias: mean error {np.abs(z_mean).max():.2f} sd"
    )


def test_projection_matrices_have_unit_expected_gram():
    """E[PᵀP] = I: each slab's squared Frobenius norm equals its column count.

    Exactly for Rademacher (entries ±1/sqrt(k)) and SJLT (nnz entries ±1/sqrt(nnz) per
    column); to within 5 sd of sampling error for Gaussian slabs and Kronecker factors.
    """
    bundle = tiny_lm()
    cols = 257 * 16
    for kind in ("gaussian", "rademacher", "sjlt"):
        slab = Sketcher(bundle, section(kind, k=256), seed=5).projector.matrix(
            "lm_head.weight", cols
        )
        assert slab.shape == (256, cols)
        ratio = float((slab.double() ** 2).sum()) / cols
        tolerance = 5 * math.sqrt(2 / slab.numel()) if kind == "gaussian" else 1e-6
        assert abs(ratio - 1.0) < tolerance, (kind, ratio)
    kron = Sketcher(bundle, section("kronecker", k=256, kron_dim=16), seed=5).kronecker
    p_out, p_in = kron.factors("a wide layer", 8192, 8193)  # large, so the check is tight
    final = kron.final_map("lm_head")  # [256, 16 * 16]
    for factor in (p_out, p_in, final):
        ratio = float((factor.double() ** 2).sum()) / factor.shape[1]
        assert abs(ratio - 1.0) < 5 * math.sqrt(2 / factor.numel())


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is fastest and does not fight other jobs for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- prefixes, seeds, batches


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "kronecker"])
def test_a_rescaled_prefix_is_exactly_the_smaller_sketch(kind):
    bundle = tiny_lm()
    batch = tokens(4)
    big = Sketcher(bundle, section(kind, k=128), seed=9).sketch_batch(batch)
    small = Sketcher(bundle, section(kind, k=32), seed=9).sketch_batch(batch)
    assert_float32_close(take_prefix(big, 32), small)


def test_sjlt_prefix_is_a_jl_sketch():
    bundle = tiny_lm()
    batch = tokens(10, seed=3)
    sketcher = Sketcher(bundle, section("sjlt", k=512, sjlt_nnz=4), seed=1)
    _, order = explicit_matrix(sketcher)
    grads = loop_gradients(bundle, batch, order)
    # the first 128 rows are the first band: a CountSketch of width 128
    prefix = take_prefix(sketcher.sketch_batch(batch), 128)
    z = standardized_errors(prefix, grads, 2.0 / 128)
    assert np.abs(z).max() <= 6.0


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "sjlt", "kronecker"])
def test_rows_do_not_depend_on_batch_composition(kind):
    bundle = tiny_lm()
    batch = tokens(8)
    sketcher = Sketcher(
        bundle, section(kind, k=64, params=["blocks.0.*", "lm_head.weight"]), seed=4
    )
    whole = sketcher.sketch_batch(batch)
    order = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])
    parts = [order[:3], order[3:8]]
    pieces = [sketcher.sketch_batch({"tokens": batch["tokens"][idx]}) for idx in parts]
    shuffled = np.concatenate(pieces)[np.argsort(order.numpy())]
    assert_float32_close(shuffled, whole, rtol=1e-5)
    single = sketcher.sketch_batch({"tokens": batch["tokens"][6:7]})
    assert_float32_close(single[0], whole[6], rtol=1e-5)


def test_sketches_are_deterministic_in_the_seed():
    bundle = tiny_lm()
    batch = tokens(3)
    for kind in ("gaussian", "sjlt", "kronecker"):
        first = Sketcher(bundle, section(kind, k=32), seed=3).sketch_batch(batch)
        again = Sketcher(bundle, section(kind, k=32), seed=3).sketch_batch(batch)
        other = Sketcher(bundle, section(kind, k=32), seed=4).sketch_batch(batch)
        np.testing.assert_array_equal(first, again)
        assert not np.allclose(first, other, atol=1e-3)


# ---------------------------------------------------------------- task residuals


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "sjlt", "kronecker"])
def test_task_residual_is_minus_projected_mean_gradient(kind):
    bundle = tiny_lm()
    batch = tokens(8, seed=6)
    globs = ["blocks.0.attn.*", "ln_f.weight"] if kind == "kronecker" else []
    sketcher = Sketcher(bundle, section(kind, k=64, kron_dim=6, params=globs), seed=8)
    matrix, order = explicit_matrix(sketcher)
    expected = -(matrix @ loop_gradients(bundle, batch, order).mean(0))
    splits = [slice(0, 5), slice(5, 7), slice(7, 8)]  # unequal batches: weights by batch size
    residual = sketcher.task_residual({"tokens": batch["tokens"][s]} for s in splits)
    assert residual.dtype == np.float32 and residual.shape == (64,)
    assert_float32_close(residual, expected.numpy())
    assert_float32_close(residual, -sketcher.sketch_batch(batch).mean(0))


# ---------------------------------------------------------------- configuration


def test_unknown_parameter_glob_is_a_config_error():
    with pytest.raises(ConfigError, match="matches no parameter"):
        Sketcher(tiny_lm(), section("gaussian", params=["nope.*"]), seed=0)


def test_describe_names_everything_that_defines_the_projection():
    sketcher = Sketcher(tiny_mlp(), section("sjlt", k=16, sjlt_nnz=2, params=["fc2.*"]), seed=7)
    info = sketcher.describe()
    assert info["projection"] == "sjlt" and info["k"] == 16 and info["seed"] == 7
    assert info["params"] == ["fc2.weight", "fc2.bias"] and info["sjlt_nnz"] == 2
    assert info["kron_dim"] is None and info["num_params"] == 8 * 3 + 3
