"""Selection (step 5): the objective, exact lazy greedy, streaming selection, the additive baseline."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import zarr

from grasp_cli.errors import InputError
from grasp_cli.select import (
    SelectionObjective,
    StreamingTopB,
    additive_top_b,
    aggregation_scale,
    budget_count,
    domain_caps,
    greedy_select,
    objective_from_bootstrap,
    objective_from_tasks,
    select,
    stream_select,
)

# ---------------------------------------------------------------- fixtures


def clustered_problem(seed: int, n: int = 400, k: int = 16, budget: int = 40, n_tasks: int = 4):
    """Clustered sketches and per-task (v_t, Q_t, c_t) with both terms mattering."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(8, k)) * 2.0
    labels = rng.integers(0, 8, n)
    phi = centers[labels] + rng.normal(size=(n, k))
    v = rng.normal(size=(n_tasks, k)) + centers[:n_tasks]
    low = rng.normal(size=(n_tasks, k, k)) / np.sqrt(k)
    q = 0.5 * np.einsum("tab,tcb->tac", low, low) + 0.1 * np.eye(k)
    c = np.zeros(n_tasks)
    return phi, labels, v, q, c


def plain_objective(seed: int, budget: int = 40, **kw):
    phi, labels, v, q, c = clustered_problem(seed, budget=budget, **kw)
    return phi, labels, objective_from_tasks(v, q, c, scale=1.0 / budget)


def subset_value(obj: SelectionObjective, phi: np.ndarray, subset) -> float:
    return float(obj.value(phi[list(subset)].sum(axis=0)))


def reference_greedy(phi: np.ndarray, obj: SelectionObjective, budget: int) -> list[int]:
    """Greedy by evaluating F(S ∪ {i}) for every i — no incremental algebra, no laziness."""
    chosen: list[int] = []
    s = np.zeros(obj.dim)
    for _ in range(budget):
        values = np.asarray(obj.value(s[None, :] + phi[:, : obj.dim]))
        values[chosen] = -np.inf
        pick = int(np.argmax(values))
        chosen.append(pick)
        s = s + phi[pick, : obj.dim]
    return chosen


# ---------------------------------------------------------------- objective


def test_plain_objective_is_the_weighted_sum_of_task_surrogates():
    rng = np.random.default_rng(0)
    k, budget = 6, 5
    phi = rng.normal(size=(20, k))
    v = rng.normal(size=(3, k))
    full = rng.normal(size=(k, k))
    quads = [full @ full.T, rng.uniform(0.1, 1.0, k), 0.7]  # full, diagonal, scalar·I
    c = np.array([0.5, -1.0, 2.0])
    w = np.array([1.0, 2.0, 0.5])
    sigma = np.array([0.3, 1.0, 2.0])
    obj = objective_from_tasks(
        v, quads, c, scale=aggregation_scale("mean", budget), weights=w, sigma=sigma
    )
    subset = [1, 4, 7, 9, 13]
    m = phi[subset].mean(axis=0)
    dense = [quads[0], np.diag(quads[1]), 0.7 * np.eye(k)]
    expected = sum(w[t] * (c[t] + v[t] @ m - 0.5 * m @ dense[t] @ m) / sigma[t] for t in range(3))
    assert subset_value(obj, phi, subset) == pytest.approx(expected, rel=1e-12)
    # the robust-tasks objective with kappa = 0 is the same sum divided by the total weight
    robust = objective_from_tasks(
        v, quads, c, scale=1 / budget, weights=w, sigma=sigma, robust="tasks", kappa=0.0
    )
    assert subset_value(robust, phi, subset) == pytest.approx(expected / w.sum(), rel=1e-12)


@pytest.mark.parametrize("mode", ["none", "tasks", "bootstrap"])
def test_gradient_matches_finite_differences(mode):
    phi, _, v, q, c = clustered_problem(1, k=8)
    if mode == "bootstrap":
        rng = np.random.default_rng(5)
        refits = [
            (v + 0.3 * rng.normal(size=v.shape), q * rng.uniform(0.5, 1.5), c) for _ in range(5)
        ]
        obj = objective_from_bootstrap(refits, scale=1 / 40, kappa=1.5)
    else:
        obj = objective_from_tasks(v, q, c, scale=1 / 40, robust=mode, kappa=1.5)
    s = phi[:40].sum(axis=0)
    grad = obj.gradient(s)
    eps = 1e-5
    numeric = np.array(
        [(obj.value(s + eps * e) - obj.value(s - eps * e)) / (2 * eps) for e in np.eye(len(s))]
    )
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)
    assert obj.is_quadratic == (mode == "none")


def test_robust_objective_is_mean_minus_kappa_std_across_tasks():
    phi, _, v, q, c = clustered_problem(2)
    obj = objective_from_tasks(v, q, c, scale=1 / 40, robust="tasks", kappa=2.0)
    s = phi[:40].sum(axis=0)
    m = s / 40
    per_task = np.array([c[t] + v[t] @ m - 0.5 * m @ q[t] @ m for t in range(len(v))])
    assert obj.value(s) == pytest.approx(per_task.mean() - 2.0 * per_task.std(), rel=1e-12)


def test_line_search_maximizes_along_the_segment():
    phi, _, obj = plain_objective(3)
    s, target = phi[:40].sum(axis=0), phi[40:80].sum(axis=0)
    gamma = obj.line_search(s, target - s)
    grid = np.linspace(0, 1, 2001)
    values = obj.value(s[None, :] + grid[:, None] * (target - s)[None, :])
    assert obj.value(s + gamma * (target - s)) >= values.max() - 1e-9


def test_budget_count_and_caps():
    assert budget_count(0.25, 1000) == 250
    assert budget_count(40, 1000) == 40
    with pytest.raises(InputError):
        budget_count(2000, 1000)
    caps = domain_caps({"web": 0.1, "code": 7}, ["web", "code", "books"], budget=50)
    np.testing.assert_array_equal(caps, [5, 7, 50])
    with pytest.raises(InputError, match="unknown domains"):
        domain_caps({"nope": 0.5}, ["web"], budget=10)


# ---------------------------------------------------------------- greedy


@pytest.mark.parametrize("robust", ["none", "tasks"])
def test_lazy_greedy_equals_plain_greedy(robust):
    phi, _, v, q, c = clustered_problem(4, n=150)
    obj = objective_from_tasks(v, q, c, scale=1 / 20, robust=robust, kappa=0.7)
    lazy = greedy_select(phi, obj, 20)
    eager = greedy_select(phi, obj, 20, lazy=False)
    np.testing.assert_array_equal(lazy.indices, eager.indices)
    np.testing.assert_array_equal(lazy.indices, reference_greedy(phi, obj, 20))
    assert lazy.history[0]["refreshes"] < 20  # laziness skipped most full updates
    # gains are exact marginal gains: they add up to F(S) − F(∅)
    assert lazy.gains.sum() == pytest.approx(lazy.value - obj.value(np.zeros(obj.dim)), rel=1e-9)
    assert lazy.value == pytest.approx(subset_value(obj, phi, lazy.indices), rel=1e-12)


def test_greedy_is_optimal_when_sketches_are_orthogonal():
    """Q-orthogonal sketches make F modular in S, where greedy is exactly optimal."""
    rng = np.random.default_rng(6)
    n, k, budget = 10, 16, 3
    basis = np.linalg.qr(rng.normal(size=(k, k)))[0]
    phi = basis[:n] * rng.uniform(0.5, 3.0, size=(n, 1))
    obj = SelectionObjective(
        linear=rng.normal(size=k) * 3, quadratic=np.eye(k), offset=[0.0], scale=1 / budget
    )
    brute = max(
        itertools.combinations(range(n), budget), key=lambda sub: subset_value(obj, phi, sub)
    )
    result = greedy_select(phi, obj, budget)
    assert sorted(result.indices.tolist()) == sorted(brute)
    assert result.value == pytest.approx(subset_value(obj, phi, brute))


def test_greedy_first_pick_and_brute_force_on_a_tiny_general_case():
    phi, _, v, q, c = clustered_problem(7, n=10, k=5)
    obj = objective_from_tasks(v, q, c, scale=1 / 3)
    result = greedy_select(phi, obj, 3)
    singles = [subset_value(obj, phi, [i]) for i in range(10)]
    assert result.indices[0] == int(np.argmax(singles))
    best = max(subset_value(obj, phi, sub) for sub in itertools.combinations(range(10), 3))
    assert result.value <= best + 1e-12
    assert result.value >= best - 0.1 * abs(best)


# ---------------------------------------------------------------- stream vs greedy


@pytest.mark.parametrize(
    "seed,robust,extra_rows",
    [
        (0, "none", 0),
        (1, "none", 0),
        (4, "none", 0),
        (1, "tasks", 0),
        (3, "tasks", 0),
        (2, "none", None),
        (4, "tasks", None),
    ],
)
def test_stream_reaches_greedy_objective(seed, robust, extra_rows):
    """extra_rows=0 brings only each pass's top-B into memory (several passes needed);
    the default also brings the next max(B, 1024) rows (here: the whole corpus at once)."""
    phi, _, v, q, c = clustered_problem(seed)
    obj = objective_from_tasks(v, q, c, scale=1 / 40, robust=robust, kappa=0.5)
    greedy = greedy_select(phi, obj, 40)
    stream = stream_select(phi, obj, 40, block_rows=64, extra_rows=extra_rows, progress=False)
    additive = additive_top_b(phi, obj, 40)
    assert greedy.value > 0
    assert stream.value >= 0.99 * greedy.value
    assert stream.value > additive.value  # interactions matter in this problem
    assert stream.value == pytest.approx(subset_value(obj, phi, stream.indices), rel=1e-6)
    assert stream.converged and stream.passes == len(stream.history) <= 10


def test_duplicates_fool_the_additive_baseline_but_not_grasp():
    rng = np.random.default_rng(8)
    n, k, budget, copies = 400, 16, 40, 50
    phi, _, v, q, c = clustered_problem(8, n=n, k=k)
    u = v.sum(axis=0)
    useful = 30.0 * u / np.linalg.norm(u)  # the best standalone score in the corpus
    dup_rows = rng.choice(n, copies, replace=False)
    phi[dup_rows] = useful
    obj = objective_from_tasks(v, q + 1.5 * np.eye(k), c, scale=1 / budget)
    is_dup = np.zeros(n, dtype=bool)
    is_dup[dup_rows] = True

    additive = additive_top_b(phi, obj, budget)
    greedy = greedy_select(phi, obj, budget)
    stream = stream_select(phi, obj, budget, block_rows=50, extra_rows=0, progress=False)
    assert is_dup[additive.indices].sum() == budget  # all copies it can take
    # a few copies are worth taking; more are redundant
    assert 1 <= is_dup[greedy.indices].sum() <= 4
    assert 1 <= is_dup[stream.indices].sum() <= 4
    assert min(greedy.value, stream.value) > additive.value


# ---------------------------------------------------------------- budgets, caps, formats


def count_per_domain(indices: np.ndarray, labels: np.ndarray, n_domains: int) -> np.ndarray:
    return np.bincount(labels[indices], minlength=n_domains)


def test_budget_and_domain_caps_are_respected_exactly():
    phi, labels, obj = plain_objective(9)
    caps = np.array([3, 10, 0, 40, 2, 8, 40, 5])  # some binding, one domain excluded
    runs = [
        greedy_select(phi, obj, 40, domains=labels, caps=caps),
        stream_select(
            phi, obj, 40, domains=labels, caps=caps, block_rows=70, extra_rows=0, progress=False
        ),
        stream_select(
            phi, obj, 40, domains=labels, caps=caps, block_rows=70, extra_rows=100, progress=False
        ),
        additive_top_b(phi, obj, 40, domains=labels, caps=caps, block_rows=70),
    ]
    uncapped = greedy_select(phi, obj, 40)
    assert np.any(count_per_domain(uncapped.indices, labels, 8) > caps)  # the caps bind
    for result in runs:
        assert len(result.indices) == 40 == len(np.unique(result.indices))
        assert np.all(count_per_domain(result.indices, labels, 8) <= caps), result.algorithm
    for stream in runs[1:3]:
        assert stream.value >= 0.99 * runs[0].value


def test_infeasible_caps_are_refused():
    phi, labels, obj = plain_objective(9)
    caps = np.full(8, 4)  # at most 32 < 40
    with pytest.raises(InputError, match="at most 32"):
        greedy_select(phi, obj, 40, domains=labels, caps=caps)
    with pytest.raises(InputError, match="at most 32"):
        stream_select(phi, obj, 40, domains=labels, caps=caps, progress=False)
    with pytest.raises(InputError, match="budget"):
        greedy_select(phi, obj, 401)


def test_streaming_top_b_matches_a_full_sort_with_ties_and_caps():
    rng = np.random.default_rng(10)
    n, budget = 1000, 60
    scores = rng.integers(0, 40, n).astype(float)  # many ties
    dom = rng.integers(0, 5, n)
    caps = np.array([5, 30, 60, 12, 0])
    top = StreamingTopB(budget, caps=caps, keep_rows=True)
    rows = np.arange(n, dtype=np.float32)[:, None].repeat(2, axis=1)
    for start in range(0, n, 97):
        sl = slice(start, min(start + 97, n))
        top.push(np.arange(n)[sl], scores[sl], rows=rows[sl], dom=dom[sl])
    order = np.lexsort((np.arange(n), -scores))
    taken, counts = [], np.zeros(5, dtype=int)
    for i in order:
        if counts[dom[i]] < caps[dom[i]] and len(taken) < budget:
            taken.append(i)
            counts[dom[i]] += 1
    idx, _ = top.result()
    np.testing.assert_array_equal(idx, taken)
    np.testing.assert_array_equal(top.rows()[:, 0], idx)


@pytest.mark.parametrize("with_caps", [False, True])
def test_a_floor_from_rows_held_prunes_the_pass_without_changing_it(with_caps):
    from grasp_cli.select.stream import _score_floor, _top_b_pass

    rng = np.random.default_rng(12)
    n, k, budget, pool = 5000, 8, 300, 700
    phi = rng.integers(-2, 3, size=(n, k)).astype(np.float32)  # many tied scores
    direction = rng.normal(size=k)
    domains = rng.integers(0, 4, n)
    caps = np.array([40, 200, 120, 90]) if with_caps else None
    plain = _top_b_pass(phi, direction, budget, domains, caps, 512, False, False, "", pool)
    held = np.sort(rng.choice(n, 1500, replace=False))  # a subset "in memory"
    scores = (phi[held] @ direction.astype(np.float32)).astype(np.float64)
    margin = (
        4 * k * np.finfo(np.float32).eps * np.abs(phi).sum(axis=1).max() * np.abs(direction).max()
    )
    floors = (
        _score_floor(scores, budget, margin, domains[held], caps),
        _score_floor(scores, pool, margin),
    )
    assert all(np.isfinite(floors))
    pruned = _top_b_pass(
        phi, direction, budget, domains, caps, 512, False, False, "", pool, floors=floors
    )
    for a, b in zip(plain, pruned, strict=True):  # (vertex, pool): ranks, scores and rows
        np.testing.assert_array_equal(a.idx, b.idx)
        np.testing.assert_array_equal(a.scores, b.scores)
        np.testing.assert_array_equal(a.take(), b.take())
    np.testing.assert_array_equal(plain[1].take(), phi[plain[1].idx])


def test_trak_top_b_streams_the_full_sort_with_ties_across_blocks():
    from grasp_cli.select.stage import streamed_top_rows

    rng = np.random.default_rng(11)
    rows = rng.integers(-3, 4, size=(70_000, 2)).astype(np.float32)  # ties everywhere
    direction = np.array([1.0, 2.0])
    scores = rows.astype(np.float64) @ direction
    expected = np.sort(np.lexsort((np.arange(len(scores)), -scores))[:500])
    np.testing.assert_array_equal(streamed_top_rows(rows, direction, 500), expected)


def test_stream_on_zarr_equals_stream_in_memory(tmp_path):
    phi, labels, obj = plain_objective(11)
    arr = zarr.open_array(
        str(tmp_path / "phi.zarr"), mode="w", shape=phi.shape, chunks=(64, 16), dtype="float32"
    )
    arr[:] = phi.astype(np.float32)
    caps = np.full(8, 9)
    kw = dict(domains=labels, caps=caps, block_rows=128, extra_rows=30, progress=False)
    on_disk = stream_select(arr, obj, 40, **kw)
    in_memory = stream_select(phi.astype(np.float32), obj, 40, prefetch=False, **kw)
    np.testing.assert_array_equal(on_disk.indices, in_memory.indices)
    assert on_disk.value == in_memory.value
    assert on_disk.passes == in_memory.passes
    reopened = zarr.open_array(str(tmp_path / "phi.zarr"), mode="r")
    via_select = select(reopened, obj, 40, algorithm="auto", greedy_max_n=100, progress=False)
    assert via_select.algorithm == "stream"
    assert select(reopened, obj, 40, greedy_max_n=1000).algorithm == "greedy"


def test_wider_sketches_use_their_prefix():
    phi, _, obj = plain_objective(12)
    wide = np.concatenate([phi, np.random.default_rng(0).normal(size=(len(phi), 5))], axis=1)
    a = greedy_select(wide, obj, 40)
    b = greedy_select(phi, obj, 40)
    np.testing.assert_array_equal(a.indices, b.indices)
    c = stream_select(wide, obj, 40, progress=False)
    d = stream_select(phi, obj, 40, progress=False)
    np.testing.assert_array_equal(c.indices, d.indices)


def test_repeats_table_counts_slots_that_repeat_content_already_selected():
    from grasp_cli.select.stage import repeats_table, row_hashes

    rows = np.array([[1, 2], [1, 2], [3, 4], [1, 2], [5, 6]], dtype=np.int32)
    content = row_hashes(rows)
    assert content[0] == content[1] == content[3] and len(set(content.tolist())) == 3
    table = repeats_table(content, {"a": np.array([0, 1, 3]), "b": np.array([0, 2, 4])})
    assert table["corpus"] == {"rows": 5, "slots": 2, "share": 2 / 5}
    assert table["a"] == {"rows": 3, "slots": 2, "share": 2 / 3}
    assert table["b"] == {"rows": 3, "slots": 0, "share": 0.0}
    many = np.random.default_rng(3).integers(0, 90_000, 150_000).astype(np.uint64)  # 3 blocks
    expected = len(many) - len(np.unique(many))
    assert repeats_table(many.copy(), {})["corpus"]["slots"] == expected
    assert repeats_table(np.array([7], dtype=np.uint64), {})["corpus"]["slots"] == 0
