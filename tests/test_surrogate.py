"""The surrogate's math against brute force and against data drawn from a known model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from grasp_cli.config import SurrogateSection
from grasp_cli.surrogate import (
    CorpusMoments,
    Datamodels,
    DomainMixture,
    GraspSurrogate,
    MethodSpec,
    SubsetFeatures,
    TrakBaseline,
    bootstrap_correlations,
    compute_subset_features,
    dense_membership,
    example_gains,
    fit_method,
    geometry_matrix,
    hoeffding_lcb,
    pearson,
    rank_columns,
    run_protocol,
    spearman,
    split_by_role,
    surrogate_gains,
)

TASKS = ["t0", "t1"]


# ------------------------------------------------------------------ synthetic data


def make_world(
    seed: int = 0,
    *,
    ratio: float = 1.0,
    n: int = 600,
    k: int = 16,
    domains: int = 4,
    subsets: int = 160,
    noise: float = 0.02,
):
    """Clustered sketches, mixture-shaped subsets, utilities from the true GRASP formula.

    ``ratio`` sets how strong the quadratic (redundancy) term is relative to the linear
    one (0 = purely additive). Returns a dict with everything a test needs.
    """
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(domains, k))
    centers[0] *= 2.5  # one domain with much larger gradients
    dom = rng.integers(0, domains, size=n)
    phi = (centers[dom] + 0.5 * rng.normal(size=(n, k))).astype(np.float32)
    residuals = rng.normal(size=(len(TASKS), k)) + centers[0]
    member = np.zeros((subsets, n), dtype=bool)
    for j in range(subsets):
        weights = rng.dirichlet(np.full(domains, 0.5))
        size = rng.integers(n // 10, n // 2)
        for d in range(domains):
            idx = np.flatnonzero(dom == d)
            member[
                j, rng.choice(idx, min(len(idx), int(round(weights[d] * size))), replace=False)
            ] = True
        member[j, rng.integers(n)] = True
    means = member @ phi.astype(np.float64) / member.sum(axis=1, keepdims=True)
    lin = means @ residuals.T
    quad = 0.5 * np.sum(means**2, axis=1)
    a = np.array([1.0, 0.5])
    b = ratio * a * lin.std(axis=0) / quad.std()
    c = np.array([-3.0, -2.0])
    utilities = c + a * lin - b * quad[:, None]
    utilities += noise * utilities.std(axis=0) * rng.normal(size=utilities.shape)
    features, moments = compute_subset_features(
        np.packbits(member, axis=1),
        [(s, phi[s : s + 128]) for s in range(0, n, 128)],
        domains=dom,
        normalized_dims=(8, 16),
        with_overlaps=True,
    )
    roles = np.array(["fit"] * 100 + ["eval"] * (subsets - 100))
    return {
        "phi": phi,
        "dom": dom,
        "residuals": residuals,
        "member": member,
        "utilities": utilities,
        "a": a,
        "b": b,
        "c": c,
        "features": features,
        "moments": moments,
        "roles": roles,
    }


SETTINGS = SurrogateSection(  # the quadratic family: k' × alignment × G × λ (16 candidates)
    k_grid=[8, 16],
    alignment_grid=["plain", "natural"],
    quadratic_grid=[True],
    geometry_grid=["identity", "diagonal"],
    ridge_grid=[1.0, float("inf")],
    aggregation_grid=["mean"],
    cost_curve=[8, 16, 200],
    bootstrap=100,
)


@pytest.fixture(scope="module")
def quadratic_world():
    return make_world(0, ratio=1.0)


@pytest.fixture(scope="module")
def quadratic_protocol(quadratic_world):
    w = quadratic_world
    ff, uf, fe, ue = split_by_role(w["features"], w["utilities"], w["roles"])
    return run_protocol(
        ff,
        uf,
        fe,
        ue,
        residuals=w["residuals"],
        moments=w["moments"],
        settings=SETTINGS,
        seed=3,
        task_names=TASKS,
    )


def mean_rows(result, n_fit: int = 100) -> dict[str, float]:
    return {
        r["method"]: r["spearman"]
        for r in result.evaluation_rows
        if r["task"] == "mean" and r["n_fit"] == n_fit
    }


# ------------------------------------------------------------------------ features


def test_features_from_packed_bits_equal_dense_computation():
    rng = np.random.default_rng(1)
    n, k, m = 203, 6, 7  # N not a multiple of 8
    phi = rng.normal(size=(n, k)).astype(np.float32)
    member = rng.random((m, n)) < 0.4
    dom = rng.integers(0, 3, size=n)
    packed = np.packbits(member, axis=1)
    # Uneven blocks, out of order, not aligned to bytes.
    blocks = [(150, phi[150:]), (0, phi[:13]), (13, phi[13:150])]
    feats, moments = compute_subset_features(
        packed,
        blocks,
        domains=dom,
        domain_names=["x", "y", "z"],
        normalized_dims=(3, 6),
        with_overlaps=True,
    )
    x = member.astype(np.float64)
    p64 = phi.astype(np.float64)
    np.testing.assert_array_equal(dense_membership(packed, n), member)
    np.testing.assert_allclose(feats.sums, x @ p64, rtol=1e-12)
    np.testing.assert_array_equal(feats.sizes, member.sum(axis=1))
    np.testing.assert_allclose(feats.sq_norm_sums, x @ np.sum(p64**2, axis=1), rtol=1e-12)
    for d in (3, 6):
        unit = p64[:, :d] / np.linalg.norm(p64[:, :d], axis=1, keepdims=True)
        np.testing.assert_allclose(feats.normalized_sums[d], x @ unit, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(feats.domain_counts, x @ np.eye(3)[dom])
    np.testing.assert_array_equal(feats.overlaps, x @ x.T)
    np.testing.assert_allclose(moments.gram, p64.T @ p64, rtol=1e-12)
    np.testing.assert_allclose(moments.total, p64.sum(axis=0), rtol=1e-12)
    assert moments.n == n and feats.n_examples == n
    sub = feats.take([4, 1])
    np.testing.assert_array_equal(sub.index, [4, 1])
    np.testing.assert_array_equal(sub.overlaps, (x @ x.T)[[4, 1]])  # columns stay global


def test_features_refuse_blocks_that_miss_members():
    member = np.zeros((2, 16), dtype=bool)
    member[0, 15] = True
    phi = np.ones((16, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="member bits"):
        compute_subset_features(np.packbits(member, axis=1), [(0, phi[:12])])
    with pytest.raises(ValueError, match="overlap"):
        compute_subset_features(np.packbits(member, axis=1), [(0, phi[:10]), (8, phi[8:])])


def test_geometries_have_unit_mean_eigenvalue():
    rng = np.random.default_rng(2)
    phi = rng.normal(size=(50, 5)) * np.array([1, 2, 3, 4, 5])
    moments = CorpusMoments(n=50, total=phi.sum(0), gram=phi.T @ phi)
    for name in ("identity", "diagonal", "whitened"):
        g = geometry_matrix(name, 4, moments)
        assert g.shape == (4, 4)
        assert np.trace(g) / 4 == pytest.approx(1.0)
    white = geometry_matrix("whitened", 4, moments)
    c = phi[:, :4].T @ phi[:, :4] / 50
    np.testing.assert_allclose(white, c / (np.trace(c) / 4))
    np.testing.assert_allclose(geometry_matrix("diagonal", 4, moments), np.diag(np.diag(white)))


# -------------------------------------------------------------------------- model


def test_fit_recovers_true_curvature_and_alignment(quadratic_world):
    w = quadratic_world
    model = GraspSurrogate(w["residuals"]).fit(w["features"], w["utilities"])
    np.testing.assert_allclose(model.alignment_, w["a"], rtol=0.02)
    np.testing.assert_allclose(model.curvature_, w["b"], rtol=0.05)
    np.testing.assert_allclose(model.intercepts_, w["c"], rtol=0.02)


def test_fit_satisfies_kkt_conditions_of_the_convex_program(quadratic_world):
    w = quadratic_world
    feats = w["features"]
    # Task 1 gets a flipped sign so that the a >= 0 constraint must be active.
    utilities = w["utilities"] * np.array([1.0, -1.0])
    model = GraspSurrogate(
        w["residuals"], k_prime=12, ridge=0.3, geometry="whitened", moments=w["moments"]
    ).fit(feats, utilities)
    means = model.aggregates(feats)
    x_align = means @ model.residuals.T
    x_quad = -0.5 * np.einsum("ij,jk,ik->i", means, model.metric_, means)
    assert model.alignment_[1] == 0.0
    for t in range(2):
        err = utilities[:, t] - model.predict(feats)[:, t]
        scale = np.abs(utilities[:, t]).sum() * np.abs(means).max()
        assert abs(err.sum()) < 1e-8 * np.abs(utilities[:, t]).sum()
        grad_w = -means.T @ err + model.ridge_abs_ * model.corrections_[t]
        assert np.abs(grad_w).max() < 1e-8 * scale
        for coef, x in ((model.alignment_[t], x_align[:, t]), (model.curvature_[t], x_quad)):
            slope = float(x @ err)  # minus half the loss gradient
            tol = 1e-8 * np.abs(x).sum() * np.abs(utilities[:, t]).max()
            if coef > 0:
                assert abs(slope) < tol
            else:
                assert slope < tol  # increasing the coefficient would not help


def test_ridge_is_scale_free_and_infinite_ridge_means_no_correction(quadratic_world):
    w = quadratic_world
    feats = w["features"]
    base = GraspSurrogate(w["residuals"], ridge=0.5).fit(feats, w["utilities"])
    scaled_feats = SubsetFeatures(sums=feats.sums * 7.0, sizes=feats.sizes, index=feats.index)
    scaled = GraspSurrogate(w["residuals"] * 3.0, ridge=0.5).fit(scaled_feats, w["utilities"] * 5.0)
    np.testing.assert_allclose(scaled.predict(scaled_feats), 5.0 * base.predict(feats), rtol=1e-8)
    none = GraspSurrogate(w["residuals"], ridge=float("inf")).fit(feats, w["utilities"])
    assert np.all(none.corrections_ == 0.0)
    assert all(t["delta_norm"] == 0.0 for t in none.params()["tasks"])


def test_params_round_trip_through_json(quadratic_world):
    w = quadratic_world
    model = GraspSurrogate(
        w["residuals"],
        k_prime=8,
        geometry="diagonal",
        ridge=1.0,
        aggregation="sum",
        moments=w["moments"],
        task_names=TASKS,
    )
    model.fit(w["features"], w["utilities"])
    params = json.loads(json.dumps(model.params(), allow_nan=False))
    rebuilt = GraspSurrogate.from_arrays(params, model.to_arrays())
    np.testing.assert_allclose(rebuilt.predict(w["features"]), model.predict(w["features"]))
    assert params["ridge"] == 1.0 and params["geometry"] == "diagonal" and params["k"] == 8
    inf_params = GraspSurrogate(w["residuals"]).fit(w["features"], w["utilities"]).params()
    assert json.loads(json.dumps(inf_params, allow_nan=False))["ridge"] == "inf"


def test_non_finite_fit_utilities_are_refused(quadratic_world):
    w = quadratic_world
    bad = w["utilities"].copy()
    bad[5, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        GraspSurrogate(w["residuals"]).fit(w["features"], bad)


# ---------------------------------------------------------------------- baselines


def test_trak_scores_equal_per_example_sums():
    rng = np.random.default_rng(4)
    phi = rng.normal(size=(40, 5))
    member = rng.random((6, 40)) < 0.5
    r = rng.normal(size=(2, 5))
    moments = CorpusMoments(n=40, total=phi.sum(0), gram=phi.T @ phi)
    feats = SubsetFeatures(sums=member @ phi, sizes=member.sum(1).astype(float), index=np.arange(6))
    model = TrakBaseline(r, moments, k_prime=4, ridge=0.1, aggregation="mean")
    model.fit(feats, rng.normal(size=(6, 2)))  # the scores do not depend on the utilities
    p = phi[:, :4]
    kernel = p.T @ p + 0.1 * np.trace(p.T @ p) / 4 * np.eye(4)
    tau = p @ np.linalg.solve(kernel, r[:, :4].T)  # [N, T] per-example scores
    expected = np.stack([tau[member[j]].mean(axis=0) for j in range(6)])
    np.testing.assert_allclose(model.scores(feats), expected, rtol=1e-10)


def test_datamodels_dual_equals_primal_ridge():
    rng = np.random.default_rng(5)
    n, m = 30, 12
    member = rng.random((m, n)) < 0.5
    x = member.astype(float)
    utilities = rng.normal(size=(m, 2))
    feats = SubsetFeatures(
        sums=np.zeros((m, 1)), sizes=x.sum(1), index=np.arange(m), overlaps=x @ x.T
    )
    fit_rows, new_rows = np.arange(9), np.arange(9, 12)
    model = Datamodels(ridge=0.2).fit(feats.take(fit_rows), utilities[fit_rows])
    xf = x[fit_rows]
    xc = xf - xf.mean(0)
    mu = 0.2 * np.trace(xc @ xc.T) / len(fit_rows)
    beta = np.linalg.solve(
        xc.T @ xc + mu * np.eye(n), xc.T @ (utilities[fit_rows] - utilities[fit_rows].mean(0))
    )
    expected = utilities[fit_rows].mean(0) + (x[new_rows] - xf.mean(0)) @ beta
    np.testing.assert_allclose(model.predict(feats.take(new_rows)), expected, rtol=1e-8)


def test_domain_mixture_is_exact_on_linear_mixture_utilities():
    rng = np.random.default_rng(6)
    counts = rng.integers(1, 20, size=(15, 3)).astype(float)
    props = counts / counts.sum(1, keepdims=True)
    utilities = (props @ np.array([1.0, -2.0, 0.5]))[:, None]
    feats = SubsetFeatures(
        sums=np.zeros((15, 1)), sizes=counts.sum(1), index=np.arange(15), domain_counts=counts
    )
    model = DomainMixture(ridge=0.0).fit(feats.take(range(10)), utilities[:10])
    np.testing.assert_allclose(model.predict(feats.take(range(10, 15))), utilities[10:], atol=1e-10)


# ------------------------------------------------------------------------ metrics


def brute_ranks(x: np.ndarray) -> np.ndarray:
    return np.array([1 + np.sum(x < v) + 0.5 * (np.sum(x == v) - 1) for v in x])


def brute_spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = brute_ranks(x), brute_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float(rx @ ry / math.sqrt((rx @ rx) * (ry @ ry)))


def test_spearman_matches_brute_force_with_ties():
    rng = np.random.default_rng(7)
    for _ in range(20):
        x = rng.integers(0, 6, size=25).astype(float)
        y = x + rng.integers(-3, 4, size=25)
        assert spearman(x, y) == pytest.approx(brute_spearman(x, y), abs=1e-12)
        np.testing.assert_allclose(rank_columns(x), brute_ranks(x))
    xs = rng.integers(0, 4, size=(30, 3)).astype(float)
    ys = rng.normal(size=(30, 3))
    expected = [brute_spearman(xs[:, j], ys[:, j]) for j in range(3)]
    np.testing.assert_allclose(spearman(xs, ys), expected, atol=1e-12)
    assert spearman(np.full(10, 2.5), ys[:10, 0]) == 0.0
    assert pearson(np.full(10, 0.1) * 3, ys[:10, 0]) == 0.0
    assert pearson(ys[:, 0], 2 * ys[:, 0] + 1) == pytest.approx(1.0)


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(8)
    truth = rng.normal(size=(60, 2))
    pred = truth + 0.7 * rng.normal(size=(60, 2))
    one = bootstrap_correlations(pred, truth, n_boot=300, seed=11)
    two = bootstrap_correlations(pred, truth, n_boot=300, seed=11)
    np.testing.assert_array_equal(one["low"], two["low"])
    rho = spearman(pred, truth)
    assert np.all(one["low"] < rho) and np.all(rho < one["high"])
    assert one["mean_low"] < rho.mean() < one["mean_high"]


# -------------------------------------------------------------------------- LCB


class _NoisyOracle:
    """Predicts the true utility (feature column 0) plus noise of a given level (column 1)."""

    def __init__(self, level: float) -> None:
        self.level = level

    def fit(self, features, utilities):
        return self

    def predict(self, features):
        return (features.sums[:, :1] + self.level * features.sums[:, 1:2]).repeat(2, axis=1)


def test_lcb_picks_the_best_candidate_of_a_finite_grid():
    rng = np.random.default_rng(9)
    truth = rng.normal(size=60)
    sums = np.stack([truth, rng.normal(size=60)], axis=1)
    feats = SubsetFeatures(sums=sums, sizes=np.ones(60), index=np.arange(60))
    utilities = np.stack([truth, truth], axis=1)
    grid = [{"level": 3.0}, {"level": 0.2}, {"level": 1.0}]
    spec = MethodSpec("oracle", grid, lambda c: _NoisyOracle(c["level"]), lambda c: (c["level"],))
    fit = fit_method(spec, feats, utilities, folds=5, repeats=2, delta=0.1, seed=0)
    assert fit.chosen == {"level": 0.2}
    rows = fit.lcb_rows()
    means = [r["mean"] for r in rows]
    assert means[1] > means[2] > means[0]
    for row in rows:
        assert row["n"] == 5 * 2 * 2  # folds × repeats × tasks
        assert row["lcb"] == pytest.approx(
            row["mean"] - 2.0 * math.sqrt(math.log(3 / 0.1) / (2 * row["n"]))
        )
    # Identical predictions: the tie goes to the simpler (smaller complexity key) candidate.
    tie = MethodSpec(
        "tie",
        [{"level": 1.0, "cost": 2}, {"level": 1.0, "cost": 1}],
        lambda c: _NoisyOracle(c["level"]),
        lambda c: (c["cost"],),
    )
    assert (
        fit_method(tie, feats, utilities, folds=5, repeats=1, delta=0.1, seed=0).chosen["cost"] == 1
    )
    assert hoeffding_lcb(0.5, 0, 3, 0.1) == -math.inf


# ------------------------------------------------------------------------- protocol


def test_grasp_beats_additive_baselines_on_held_out_subsets(quadratic_protocol):
    rho = mean_rows(quadratic_protocol)
    assert rho["grasp"] > 0.95
    for name in ("additive", "trak", "cosine", "datamodels", "regmix"):
        assert rho["grasp"] > rho[name] + 0.2, (name, rho)
    assert rho["constant"] == 0.0
    assert quadratic_protocol.surrogate.curvature_.min() > 0


def test_protocol_tables_have_the_promised_shape(quadratic_protocol):
    result = quadratic_protocol
    fit_counts = sorted({r["n_fit"] for r in result.evaluation_rows if r["method"] == "grasp"})
    assert fit_counts == [8, 16, 100]  # 200 >= number of fit subsets is skipped
    for method in ("grasp", "trak"):
        rows = [r for r in result.evaluation_rows if r["method"] == method and r["n_fit"] == 100]
        per_task = [r["spearman"] for r in rows if r["task"] != "mean"]
        mean_row = next(r for r in rows if r["task"] == "mean")
        assert mean_row["spearman"] == pytest.approx(np.mean(per_task))
        assert mean_row["n_eval"] == 60
        assert mean_row["ci_low"] <= mean_row["spearman"] <= mean_row["ci_high"] + 1e-12
    grasp_lcb = [r for r in result.lcb_rows if r["method"] == "grasp" and r["n_fit"] == 100]
    assert len(grasp_lcb) == 2 * 2 * 2 * 2 and sum(r["chosen"] for r in grasp_lcb) == 1
    chosen = next(r for r in grasp_lcb if r["chosen"])
    assert chosen["lcb"] == max(r["lcb"] for r in grasp_lcb)
    assert result.surrogate.k_prime == chosen["k"] and result.surrogate.n_fit_ == 100


def test_grasp_grid_nests_the_additive_models_and_trak_directions():
    """With quadratic_grid [true, false] and the kernel alignment, the grid holds, for every
    feature prefix, the additive models (no geometry) beside the quadratic ones."""
    from grasp_cli.surrogate.protocol import FeatureSet, grasp_spec

    w = make_world(2)
    settings = SurrogateSection(
        k_grid=[8],
        alignment_grid=["plain", "kernel"],
        kernel_ridge_grid=[0.1, 1.0],
        quadratic_grid=[True, False],
        geometry_grid=["identity", "whitened"],
        ridge_grid=[float("inf")],
        aggregation_grid=["mean", "sum"],
    )
    spec = grasp_spec([FeatureSet("sketch", w["residuals"], w["moments"])], settings)
    dims = 2  # k' = 8 and the whole set (16)
    alignments = 1 + 2  # plain, kernel × 2 ridges
    assert len(spec.grid) == dims * alignments * (2 + 1) * 2  # (2 geometries + additive) × agg
    additive = [c for c in spec.grid if not c["quadratic"]]
    assert all(c["geometry"] is None for c in additive)
    assert {(c["alignment"], c["kernel_ridge"]) for c in additive} == {
        ("plain", None),
        ("kernel", 0.1),
        ("kernel", 1.0),
    }
    model = spec.build(additive[0]).fit(w["features"], w["utilities"])
    assert np.all(model.curvature_ == 0)


def test_additive_world_gives_no_curvature_and_no_loss():
    w = make_world(1, ratio=0.0, subsets=130)
    ff, uf, fe, ue = split_by_role(w["features"], w["utilities"], w["roles"][:130])
    settings = SurrogateSection(
        k_grid=[16],
        geometry_grid=["identity"],
        ridge_grid=[1.0, float("inf")],
        cost_curve=[],
        bootstrap=20,
    )
    result = run_protocol(
        ff,
        uf,
        fe,
        ue,
        residuals=w["residuals"],
        moments=w["moments"],
        settings=settings,
        seed=0,
        task_names=TASKS,
    )
    model = result.surrogate
    means = model.aggregates(ff)
    penalty = 0.5 * model.curvature_ * np.sum(means**2, axis=1).std()
    linear = model.alignment_ * (means @ model.residuals.T).std(axis=0)
    assert np.all(penalty < 0.02 * linear)
    rho = mean_rows(result, n_fit=100)
    assert rho["grasp"] >= rho["additive"] - 0.01


def test_evaluation_subsets_cannot_leak_into_fitting_or_lcb(quadratic_world):
    w = quadratic_world
    ff, uf, fe, ue = split_by_role(w["features"], w["utilities"], w["roles"])
    settings = SurrogateSection(
        k_grid=[8, 16],
        geometry_grid=["identity", "whitened"],
        ridge_grid=[1.0, float("inf")],
        cost_curve=[16],
        bootstrap=20,
    )

    def run(eval_utilities):
        return run_protocol(
            ff,
            uf,
            fe,
            eval_utilities,
            residuals=w["residuals"],
            moments=w["moments"],
            settings=settings,
            seed=5,
            task_names=TASKS,
        )

    clean = run(ue)
    poisoned_values = -1e9 * ue + np.random.default_rng(0).normal(size=ue.shape) * 1e12
    poisoned = run(poisoned_values)
    assert clean.lcb_rows == poisoned.lcb_rows
    assert clean.surrogate.params() == poisoned.surrogate.params()
    for key, value in clean.surrogate.to_arrays().items():
        np.testing.assert_array_equal(value, poisoned.surrogate.to_arrays()[key])
    assert clean.chosen == poisoned.chosen
    assert mean_rows(clean)["grasp"] != mean_rows(poisoned)["grasp"]  # evaluation did see them
    nan_eval = ue.copy()
    nan_eval[0, 0] = np.nan
    with pytest.raises(ValueError, match="evaluation utilities"):
        run(nan_eval)


# --------------------------------------------------------------------------- gains


@pytest.mark.parametrize("aggregation", ["mean", "sum"])
def test_gains_equal_brute_force_differences(quadratic_world, aggregation):
    w = quadratic_world
    model = GraspSurrogate(
        w["residuals"],
        k_prime=12,
        geometry="whitened",
        ridge=1.0,
        aggregation=aggregation,
        moments=w["moments"],
    ).fit(w["features"], w["utilities"])
    phi = w["phi"][:80].astype(np.float64)
    rng = np.random.default_rng(10)
    in_ref = rng.random(80) < 0.3
    ref_sum, ref_size = phi[in_ref].sum(0), int(in_ref.sum())
    gains = surrogate_gains(
        model, w["phi"][:80], reference_sum=ref_sum, reference_size=ref_size, in_reference=in_ref
    )
    np.testing.assert_allclose(gains.alignment - gains.redundancy, gains.gain, rtol=1e-12)

    def aggregate(total, size):
        return total[:12] / (size if aggregation == "mean" else model.n_ref_)

    def parts(m):
        lin = m @ model.linear_vectors.T
        quad = 0.5 * (m @ model.metric_ @ m) * model.curvature_
        return lin, quad

    for i in range(80):
        if in_ref[i]:
            before, after = aggregate(ref_sum - phi[i], ref_size - 1), aggregate(ref_sum, ref_size)
        else:
            before, after = aggregate(ref_sum, ref_size), aggregate(ref_sum + phi[i], ref_size + 1)
        expected = (
            model.predict_aggregates(after[None])[0] - model.predict_aggregates(before[None])[0]
        )
        np.testing.assert_allclose(gains.gain[i], expected, rtol=1e-9, atol=1e-12)
        (lin_a, quad_a), (lin_b, quad_b) = parts(after), parts(before)
        np.testing.assert_allclose(gains.alignment[i], lin_a - lin_b, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(gains.redundancy[i], quad_a - quad_b, rtol=1e-9, atol=1e-12)


def test_redundant_examples_have_larger_redundancy():
    # R sits on e1: a copy of e1 is redundant, an orthogonal e2 is not.
    v = np.array([[1.0, 1.0]])
    gains = example_gains(
        np.array([[1.0, 0.0], [0.0, 1.0]]),
        v,
        np.array([1.0]),
        np.eye(2),
        reference_sum=np.array([5.0, 0.0]),
        reference_size=5,
    )
    assert gains.redundancy[0, 0] > gains.redundancy[1, 0]
    assert gains.gain[1, 0] > gains.gain[0, 0]


def test_natural_alignment_preconditions_by_the_damped_metric():
    from grasp_cli.surrogate.features import CorpusMoments
    from grasp_cli.surrogate.model import NATURAL_DAMPING, GraspSurrogate

    rng = np.random.default_rng(3)
    phi = rng.normal(size=(400, 6)) * np.array([5.0, 1.0, 1.0, 0.5, 0.2, 0.1])
    moments = CorpusMoments(n=400, total=phi.sum(0), gram=phi.T @ phi)
    residuals = rng.normal(size=(2, 6))
    member = rng.random((12, 400)) < 0.3  # any fit data: the direction is computed by fit
    feats = SubsetFeatures(
        sums=member @ phi, sizes=member.sum(1).astype(float), index=np.arange(12)
    )
    utilities = rng.normal(size=(12, 2))
    model = GraspSurrogate(residuals, k_prime=4, alignment="natural", moments=moments)
    model.fit(feats, utilities)
    metric = (phi.T @ phi / 400)[:4, :4]
    expected = np.linalg.solve(
        metric + NATURAL_DAMPING * np.trace(metric) / 4 * np.eye(4), residuals[:, :4].T
    ).T
    expected *= np.linalg.norm(residuals[:, :4], axis=1, keepdims=True) / np.linalg.norm(
        expected, axis=1, keepdims=True
    )
    np.testing.assert_allclose(model.residuals, expected, rtol=1e-10)
    # the direction differs from the plain one exactly where the metric is anisotropic
    plain = GraspSurrogate(residuals, k_prime=4, moments=moments).fit(feats, utilities).residuals
    assert not np.allclose(model.residuals, plain)
    with pytest.raises(ValueError, match="needs the corpus moments"):
        GraspSurrogate(residuals, alignment="natural").fit(feats, utilities)


# ------------------------------------------------------------- TRAK features, nesting, comparisons


def _trak_world(seed: int = 7, n: int = 300, k: int = 12, m: int = 40):
    rng = np.random.default_rng(seed)
    psi = rng.normal(size=(n, k)) * np.linspace(3.0, 0.2, k)
    q = rng.uniform(0.2, 1.0, size=n)
    member = rng.random((m, n)) < rng.uniform(0.1, 0.6, size=(m, 1))
    targets = rng.normal(size=(2, k))
    return psi, q, member, targets


def test_weighted_features_sum_q_psi_and_keep_the_unweighted_kernel():
    psi, q, member, _ = _trak_world()
    packed = np.packbits(member, axis=1)
    feats, moments = compute_subset_features(
        packed, [(0, psi[:130]), (130, psi[130:])], row_weights=q
    )
    np.testing.assert_allclose(feats.sums, member @ (q[:, None] * psi), rtol=1e-10)
    np.testing.assert_allclose(moments.kernel_gram, psi.T @ psi, rtol=1e-10)
    np.testing.assert_allclose(moments.gram, (q[:, None] * psi).T @ (q[:, None] * psi), rtol=1e-10)


def test_kernel_alignment_is_trak_and_grasp_nests_it():
    """GRASP on TRAK's features with the kernel direction, no quadratic term and no correction
    ranks every subset exactly as faithful TRAK does: TRAK is inside GRASP's family."""
    psi, q, member, targets = _trak_world()
    packed = np.packbits(member, axis=1)
    trak_feats, moments = compute_subset_features(packed, [(0, psi)], row_weights=q)
    feats = SubsetFeatures(
        sums=np.zeros((len(member), 1)),
        sizes=member.sum(1).astype(float),
        index=np.arange(len(member)),
        sets={"trak": trak_feats.sums},
    )
    utilities = np.random.default_rng(1).normal(size=(len(member), 2))
    for aggregation in ("sum", "mean"):
        trak = TrakBaseline(
            targets, moments, ridge=0.1, aggregation=aggregation, feature_set="trak"
        ).fit(feats, utilities)
        grasp = GraspSurrogate(
            targets,
            alignment="kernel",
            kernel_ridge=0.1,
            quadratic=False,
            ridge=float("inf"),
            aggregation=aggregation,
            moments=moments,
            feature_set="trak",
        ).fit(feats, utilities)
        # per-example TRAK scores, brute force
        kernel = psi.T @ psi + 0.1 * np.trace(psi.T @ psi) / psi.shape[1] * np.eye(psi.shape[1])
        tau = (q[:, None] * psi) @ np.linalg.solve(kernel, targets.T)
        sizes = member.sum(1, keepdims=True)  # 'sum' is scaled by the mean fit size (n_ref)
        expected = member @ tau / (sizes if aggregation == "mean" else sizes.mean())
        np.testing.assert_allclose(trak.scores(feats), expected, rtol=1e-9)
        for t in range(2):
            assert (
                spearman(grasp.aggregates(feats) @ grasp.residuals[t], expected[:, t]) > 1 - 1e-12
            )


def test_paired_difference_interval_is_tight_for_a_clear_winner_and_zero_for_a_tie():
    from grasp_cli.surrogate.metrics import bootstrap_paired_difference

    rng = np.random.default_rng(0)
    measured = rng.normal(size=(40, 3))
    good = measured + 0.3 * rng.normal(size=measured.shape)
    bad = measured + 1.5 * rng.normal(size=measured.shape)
    diff, low, high = bootstrap_paired_difference(good, bad, measured, n_boot=400, seed=2)
    point = np.mean(spearman(good, measured)) - np.mean(spearman(bad, measured))
    assert diff == pytest.approx(point) and 0 < low < diff < high
    assert bootstrap_paired_difference(good, good, measured, n_boot=200, seed=2) == (0.0, 0.0, 0.0)


def test_student_t_quantiles_match_tables():
    from grasp_cli.surrogate.lcb import student_t_quantile

    for p, df, table in [(0.975, 9, 2.262), (0.975, 2, 4.303), (0.95, 1, 6.314), (0.99, 30, 2.457)]:
        assert student_t_quantile(p, df) == pytest.approx(table, abs=5e-4)


@pytest.mark.parametrize("ratio, quadratic", [(0.0, False), (1.0, True)])
def test_the_quadratic_term_must_beat_its_nested_twin(ratio, quadratic):
    """In an additive world the family falls back to the nested b = 0 model; where the
    interactions are real the quadratic candidate wins against its own twin."""
    w = make_world(3, ratio=ratio, subsets=130)
    ff, uf, fe, ue = split_by_role(w["features"], w["utilities"], w["roles"][:130])
    settings = SurrogateSection(
        k_grid=[16],
        alignment_grid=["plain"],
        quadratic_grid=[True, False],
        geometry_grid=["identity"],
        ridge_grid=[float("inf")],
        cost_curve=[],
        bootstrap=50,
    )
    result = run_protocol(
        ff, uf, fe, ue, residuals=w["residuals"], moments=w["moments"], settings=settings,
        seed=0, task_names=TASKS, baselines=False,
    )  # fmt: skip
    chosen = result.fits["grasp"].chosen
    assert chosen["quadratic"] is quadratic
    rows = [r for r in result.lcb_rows if r["method"] == "grasp" and r["quadratic"]]
    assert all((r["twin_gain"] > 0) == r["eligible"] for r in rows)


def test_folds_validate_only_eligible_subsets_and_train_on_the_rest():
    from grasp_cli.surrogate.lcb import repeated_kfold

    eligible = np.ones(23, dtype=bool)
    eligible[[3, 7, 20, 21, 22]] = False  # e.g. the closed loop's subsets
    splits = repeated_kfold(23, 5, 2, seed=4, eligible=eligible)
    assert len(splits) == 10
    for repeat in (splits[:5], splits[5:]):
        validated = np.concatenate([val for _, val in repeat])
        assert sorted(validated.tolist()) == np.flatnonzero(eligible).tolist()  # each once
    for train, val in splits:
        assert eligible[val].all() and set(np.flatnonzero(~eligible)) <= set(train.tolist())
        assert sorted([*train.tolist(), *val.tolist()]) == list(range(23))
    plain = repeated_kfold(23, 5, 2, seed=4)
    every = repeated_kfold(23, 5, 2, seed=4, eligible=np.ones(23, dtype=bool))
    for (a, b), (c, d) in zip(plain, every, strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
