"""The trainer, task evaluation and vmapped multi-model training, on tiny models."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from grasp_cli.config import ModelSection, ReferenceSection, RetrainSection
from grasp_cli.models import DataShape, ModelBundle, build_model
from grasp_cli.train import (
    TrainRecipe,
    batch_rows,
    evaluate_many,
    evaluate_tasks,
    train,
    train_many,
)

SEQ = 16
N = 120


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: extra threads only add contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lm() -> ModelBundle:
    return build_model(
        ModelSection(n_layer=1, n_head=2, d_model=32), DataShape(seq_len=SEQ), seed=0
    )


@pytest.fixture(scope="module")
def corpus() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    # Half the rows repeat one short pattern (learnable), half are random bytes.
    pattern = torch.arange(SEQ + 1) % 5 + 97
    tokens = torch.randint(0, 256, (N, SEQ + 1), generator=generator)
    tokens[: N // 2] = pattern
    return {"tokens": tokens, "row": torch.arange(N)}


RECIPE = TrainRecipe(steps=12, batch_size=8, lr=3e-3, weight_decay=0.1, warmup_steps=3)


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_inputs_give_bit_identical_state(lm, corpus):
    subset = np.arange(10, 90)
    first = train(lm, corpus, subset, RECIPE, seed=5)
    again = train(lm, corpus, subset[::-1], RECIPE, seed=5)  # order and duplicates do not matter
    other_seed = train(lm, corpus, subset, RECIPE, seed=6)
    assert states_equal(first.state_dict, again.state_dict)
    np.testing.assert_array_equal(first.losses, again.losses)
    assert not states_equal(first.state_dict, other_seed.state_dict)


def test_bundle_module_is_not_modified_and_init_state_is_used(lm, corpus):
    before = {k: v.clone() for k, v in lm.module.state_dict().items()}
    scratch = train(lm, corpus, np.arange(N), RECIPE, seed=1)
    assert states_equal(before, lm.module.state_dict())
    continued = train(lm, corpus, np.arange(N), RECIPE, seed=1, init_state=scratch.state_dict)
    # Continuing from the trained state starts where scratch training ended.
    assert continued.losses[0] < scratch.losses[0] - 0.5


def test_common_random_numbers_share_positions(lm):
    low, high = np.arange(0, 50), np.arange(100, 150)
    rows_low = batch_rows(low, steps=7, batch_size=9, seed=3)
    rows_high = batch_rows(high, steps=7, batch_size=9, seed=3)
    np.testing.assert_array_equal(rows_high, rows_low + 100)
    assert not np.array_equal(batch_rows(low, 7, 9, seed=4), rows_low)


@pytest.mark.parametrize("subset", [np.array([7, 3, 11]), np.arange(N)])
def test_fixed_compute_budget_for_tiny_and_large_subsets(lm, corpus, subset):
    seen: list[torch.Tensor] = []

    def counting_loss(outputs, batch):
        seen.append(batch["row"].clone())
        return lm.per_example_loss(outputs, batch)

    counting = ModelBundle(lm.module, lm.inputs, counting_loss, None, "lm")
    result = train(counting, corpus, subset, RECIPE, seed=0)
    assert result.steps == RECIPE.steps and result.losses.shape == (RECIPE.steps,)
    assert len(seen) == RECIPE.steps and all(len(rows) == RECIPE.batch_size for rows in seen)
    assert set(torch.cat(seen).tolist()) <= set(subset.tolist())
    assert result.final_loss == result.losses[-1]


def test_training_lowers_the_loss_of_a_learnable_pattern(lm, corpus):
    recipe = TrainRecipe(steps=30, batch_size=8, lr=1e-2, warmup_steps=3)
    result = train(lm, corpus, np.arange(N // 2), recipe, seed=0)
    assert result.losses[-3:].mean() < 0.5 * result.losses[:3].mean()


def test_schedule_warms_up_then_decays_to_the_floor():
    recipe = TrainRecipe(steps=20, batch_size=1, lr=1.0, warmup_steps=4)
    lrs = [recipe.lr_at(step) for step in range(20)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))
    assert lrs[-1] == pytest.approx(recipe.min_lr_ratio)


def test_recipe_from_config_sections():
    reference = TrainRecipe.from_section(ReferenceSection())
    retrain = TrainRecipe.from_section(RetrainSection(steps=7, lr=2e-3))
    assert (reference.steps, reference.lr, reference.warmup_steps) == (300, 3e-3, 20)
    assert (retrain.steps, retrain.lr, retrain.batch_size) == (7, 2e-3, 32)


def test_bad_subsets_are_refused(lm, corpus):
    with pytest.raises(ValueError, match="empty"):
        train(lm, corpus, np.array([], dtype=np.int64), RECIPE, seed=0)
    with pytest.raises(ValueError, match="lie in"):
        train(lm, corpus, np.array([0, N]), RECIPE, seed=0)


def adam_travel_bound(recipe: TrainRecipe) -> float:
    """The most one parameter element can move under ``recipe``'s Adam steps (any gradients).

    An Adam step moves an element by ``lr_t · m̂/(√v̂ + ε)``; with β1² < β2, ``|m_t|/√v_t`` is
    at most ``(1−β1)/√(1−β2) · 1/√(1−β1²/β2)`` and the bias corrections add
    ``√(1−β2^t)/(1−β1^t)``; weight decay only shrinks. Two runs that differ only in float
    rounding can therefore never be further apart, per element, than twice the sum.
    """
    beta1, beta2 = recipe.betas
    ratio = (1 - beta1) / math.sqrt(1 - beta2) / math.sqrt(1 - beta1**2 / beta2)
    return sum(
        recipe.lr_at(t) * ratio * math.sqrt(1 - beta2 ** (t + 1)) / (1 - beta1 ** (t + 1))
        for t in range(recipe.steps)
    )


def test_train_many_matches_sequential_train(lm, corpus):
    """vmap and the sequential loop run the same arithmetic in another order, so they agree up
    to float rounding, which Adam's normalization m/(√v + ε) can amplify without bound for an
    element whose gradient is ~0 (a rarely used embedding row): there the rounding decides
    the sign of the update. So (a) with ε large enough that the update is Lipschitz in the
    gradient (|Δupdate| ≤ lr·|Δg|/ε, here ≤ 3e-3 · 1e-8 / 1e-3), every element must agree
    tightly; (b) with the default ε the losses must agree tightly and every element must lie
    within Adam's own step-size bound, whatever the CPU."""
    subsets = [np.array([1, 5, 9]), np.arange(0, N, 2), np.arange(40, 110)]
    seeds = [0, 1, 2]
    init = train(lm, corpus, np.arange(N), RECIPE, seed=9).state_dict
    for eps in (1e-3, 1e-8):
        recipe = TrainRecipe(
            steps=10,
            batch_size=8,
            lr=3e-3,
            weight_decay=0.1,
            warmup_steps=2,
            grad_clip=0.5,
            eps=eps,
        )
        sequential = [
            train(lm, corpus, s, recipe, seed, init_state=init)
            for s, seed in zip(subsets, seeds, strict=True)
        ]
        parallel = train_many(lm, corpus, subsets, recipe, seeds, init_state=init)
        bound = 2 * adam_travel_bound(recipe)
        for one, many in zip(sequential, parallel, strict=True):
            assert many.final_loss == pytest.approx(one.final_loss, rel=1e-4)
            np.testing.assert_allclose(many.losses, one.losses, rtol=1e-4)
            for key in one.state_dict:
                if eps >= 1e-3:
                    torch.testing.assert_close(
                        many.state_dict[key], one.state_dict[key], rtol=1e-4, atol=1e-6
                    )
                else:
                    gap = (many.state_dict[key] - one.state_dict[key]).abs().max().item()
                    assert gap <= bound, (key, gap, bound)
        chunked = train_many(lm, corpus, subsets, recipe, seeds, init_state=init, max_models=2)
        for a, b in zip(parallel, chunked, strict=True):
            assert b.final_loss == pytest.approx(a.final_loss, rel=1e-5)


def test_adam_travel_bound_is_tight_enough_to_catch_a_wrong_update(lm, corpus):
    """The default-ε check above can fail: a run with twice the learning rate moves elements by
    more than the bound allows relative to the right one."""
    recipe = TrainRecipe(steps=10, batch_size=8, lr=3e-3, warmup_steps=2)
    wrong = TrainRecipe(steps=10, batch_size=8, lr=3e-2, warmup_steps=2)
    init = train(lm, corpus, np.arange(N), RECIPE, seed=9).state_dict
    right = train(lm, corpus, np.arange(N), recipe, 0, init_state=init).state_dict
    other = train(lm, corpus, np.arange(N), wrong, 0, init_state=init).state_dict
    gaps = [(other[k] - right[k]).abs().max().item() for k in right]
    assert max(gaps) > 2 * adam_travel_bound(recipe)


def manual_metrics(bundle, state, data):
    module = copy.deepcopy(bundle.module)
    module.load_state_dict(state)
    module.eval()
    with torch.no_grad():
        outputs = module(*bundle.inputs(data))
        metrics = {"loss": bundle.per_example_loss(outputs, data).double().mean().item()}
        if bundle.per_example_accuracy is not None:
            metrics["accuracy"] = bundle.per_example_accuracy(outputs, data).double().mean().item()
    return metrics


def test_evaluate_matches_a_manual_loop(lm, corpus):
    state = train(lm, corpus, np.arange(N), RECIPE, seed=0).state_dict
    tasks = {
        "pattern": {"tokens": corpus["tokens"][:37]},
        "noise": {"tokens": corpus["tokens"][70:]},
    }
    got = evaluate_tasks(lm, state, tasks, batch_size=8)
    for task, data in tasks.items():
        expected = manual_metrics(lm, state, data)
        assert set(got[task]) == {"loss"}
        assert got[task]["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert got["pattern"]["loss"] < got["noise"]["loss"]


def test_evaluate_classifier_accuracy_and_evaluate_many():
    bundle = build_model(
        ModelSection(kind="mlp", hidden=16), DataShape(image_shape=(4, 4), num_classes=3), seed=0
    )
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (60, 4, 4), dtype=torch.uint8, generator=generator)
    labels = (images.float().mean((1, 2)) > 127).long() + (images[:, 0, 0] > 200).long()
    data = {"image": images, "label": labels}
    recipe = TrainRecipe(steps=15, batch_size=10, lr=1e-2)
    states = [train(bundle, data, np.arange(s, 60), recipe, seed=s).state_dict for s in (0, 20)]
    tasks = {"all": data, "head": {k: v[:13] for k, v in data.items()}}
    single = [evaluate_tasks(bundle, s, tasks, batch_size=7) for s in states]
    for state, metrics in zip(states, single, strict=True):
        for task, task_data in tasks.items():
            expected = manual_metrics(bundle, state, task_data)
            assert metrics[task]["loss"] == pytest.approx(expected["loss"], rel=1e-6)
            assert metrics[task]["accuracy"] == pytest.approx(expected["accuracy"])
    many = evaluate_many(bundle, states, tasks, batch_size=7)
    for one, batched in zip(single, many, strict=True):
        for task in tasks:
            assert batched[task]["loss"] == pytest.approx(one[task]["loss"], rel=1e-5)
            assert batched[task]["accuracy"] == pytest.approx(one[task]["accuracy"])
            assert math.isfinite(batched[task]["loss"])
