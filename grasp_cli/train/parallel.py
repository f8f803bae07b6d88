"""Several small models trained (and evaluated) at once with ``torch.func.vmap``.

For models this small, one training step is mostly per-operator overhead, so stacking
M models along a leading dimension and running each operator once for all of them can
beat M sequential runs. Every model gets its own subset and its own seed's stream, and
AdamW, the schedule and per-model gradient clipping are applied to the stacked
parameters with the same arithmetic as ``train``: results agree with ``train`` up to
float rounding (~1e-5 relative on the final loss), not bit for bit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch.func import vmap

from grasp_cli.models import ModelBundle, call_functional
from grasp_cli.progress import Progress
from grasp_cli.train.trainer import (
    Data,
    StateDict,
    TrainRecipe,
    TrainResult,
    batch_rows,
    check_indices,
    decays,
    gather,
    initial_module,
    num_examples,
    resolve_device,
    seeded_torch,
)


def train_many(
    bundle: ModelBundle,
    data: Data,
    subsets: Sequence[np.ndarray],
    recipe: TrainRecipe,
    seeds: Sequence[int] | int,
    init_state: StateDict | None = None,
    progress: bool = False,
    device: str | torch.device | None = None,
    max_models: int | None = None,
) -> list[TrainResult]:
    """``[train(bundle, data, s, recipe, seed, init_state) for s, seed in zip(subsets, seeds)]``, vmapped.

    ``seeds``: one per subset, or a single int shared by all (common random numbers).
    ``max_models``: train at most this many at once (memory); ``None`` = all together.
    ``wall_s`` of each result is its group's wall time divided by the group's size.
    """
    if isinstance(seeds, (int, np.integer)):
        seeds = [int(seeds)] * len(subsets)
    if len(seeds) != len(subsets):
        raise ValueError(f"{len(subsets)} subsets but {len(seeds)} seeds")
    group = max(1, max_models or len(subsets))
    results: list[TrainResult] = []
    for start in range(0, len(subsets), group):
        results += _train_group(
            bundle,
            data,
            subsets[start : start + group],
            recipe,
            list(seeds[start : start + group]),
            init_state,
            progress,
            resolve_device(bundle, device),
        )
    return results


def _train_group(
    bundle: ModelBundle,
    data: Data,
    subsets: Sequence[np.ndarray],
    recipe: TrainRecipe,
    seeds: list[int],
    init_state: StateDict | None,
    progress: bool,
    device: torch.device,
) -> list[TrainResult]:
    n_models = len(subsets)
    n_examples = num_examples(data)
    rows = np.stack(
        [
            batch_rows(check_indices(s, n_examples), recipe.steps, recipe.batch_size, seed)
            for s, seed in zip(subsets, seeds, strict=True)
        ],
        axis=1,
    )  # [steps, M, B]
    start = time.perf_counter()
    with seeded_torch(seeds[0], device):
        base = initial_module(bundle, init_state, device)
        base.train()
        # Every model starts from the same weights, so stacking is a broadcast copy
        # (what torch.func.stack_module_state does for identical modules).
        named = dict(base.named_parameters())
        params = {
            n: p.detach().unsqueeze(0).repeat(n_models, *([1] * p.dim())).requires_grad_(True)
            for n, p in named.items()
        }
        exp_avg = {n: torch.zeros_like(p) for n, p in params.items()}
        exp_avg_sq = {n: torch.zeros_like(p) for n, p in params.items()}
        decay = {n: recipe.weight_decay if decays(n, p) else 0.0 for n, p in named.items()}

        def mean_loss(model_params: dict[str, torch.Tensor], batch: Data) -> torch.Tensor:
            outputs = call_functional(base, model_params, bundle.inputs(batch))
            return bundle.per_example_loss(outputs, batch).mean()

        batched_loss = vmap(mean_loss, randomness="different")
        beta1, beta2 = recipe.betas
        losses = torch.empty(recipe.steps, n_models, dtype=torch.float32, device=device)
        bar = Progress(recipe.steps, f"train x{n_models}", unit="steps", enabled=progress)
        for step in range(recipe.steps):
            batch = gather(data, rows[step], device)  # {key: [M, B, ...]}
            step_losses = batched_loss(params, batch)  # [M]
            # The models share no parameters, so d(sum)/d(params[m]) = d(loss[m])/d(params[m]).
            grads = torch.autograd.grad(step_losses.sum(), list(params.values()))
            losses[step] = step_losses.detach()
            with torch.no_grad():
                if recipe.grad_clip > 0:
                    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads]).norm(
                        dim=0
                    )  # [M]
                    coef = (recipe.grad_clip / (norms + 1e-6)).clamp(max=1.0)
                    for g in grads:
                        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))
                lr = recipe.lr_at(step)
                t = step + 1
                step_size = lr / (1 - beta1**t)
                bias2_sqrt = math.sqrt(1 - beta2**t)
                for (name, p), g in zip(params.items(), grads, strict=True):
                    if decay[name]:
                        p.mul_(1 - lr * decay[name])
                    exp_avg[name].lerp_(g, 1 - beta1)
                    exp_avg_sq[name].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    denom = (exp_avg_sq[name].sqrt() / bias2_sqrt).add_(recipe.eps)
                    p.addcdiv_(exp_avg[name], denom, value=-step_size)
            bar.update()
        bar.close()
    wall = (time.perf_counter() - start) / n_models
    loss_values = losses.cpu().numpy().astype(np.float64)
    return [
        TrainResult(
            _unstack_state(base, params, m),
            float(loss_values[-1, m]),
            wall,
            recipe.steps,
            loss_values[:, m],
        )
        for m in range(n_models)
    ]


def _unstack_state(base: torch.nn.Module, params: dict[str, torch.Tensor], model: int) -> StateDict:
    """Model ``model``'s state dict, keyed like ``base.state_dict()`` (tied names included)."""
    canonical = {id(p): n for n, p in base.named_parameters()}
    alias = {n: canonical[id(p)] for n, p in base.named_parameters(remove_duplicate=False)}
    state = {}
    for key, value in base.state_dict().items():
        state[key] = params[alias[key]][model].detach().clone() if key in alias else value.clone()
    return state


def evaluate_many(
    bundle: ModelBundle,
    state_dicts: Sequence[StateDict],
    tasks: dict[str, Data],
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> list[dict[str, dict[str, float]]]:
    """``[evaluate_tasks(bundle, s, tasks, batch_size) for s in state_dicts]``, vmapped over models.

    All state dicts must share the bundle's architecture; buffers are taken from the first.
    """
    if not state_dicts:
        return []
    device = resolve_device(bundle, device)
    base = initial_module(bundle, state_dicts[0], device)
    base.eval()
    names = [n for n, _ in base.named_parameters()]
    stacked = {n: torch.stack([s[n] for s in state_dicts]).to(device) for n in names}

    def forward(
        model_params: dict[str, torch.Tensor], batch: Data
    ) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = call_functional(base, model_params, bundle.inputs(batch))
        loss = bundle.per_example_loss(outputs, batch)
        if bundle.per_example_accuracy is None:
            return loss, torch.zeros_like(loss)
        return loss, bundle.per_example_accuracy(outputs, batch)

    batched = vmap(forward, in_dims=(0, None))
    n_models = len(state_dicts)
    results: list[dict[str, dict[str, float]]] = [{} for _ in range(n_models)]
    with torch.no_grad():
        for task, data in tasks.items():
            n = num_examples(data)
            if n == 0:
                raise ValueError(f"task {task!r} has no examples")
            loss_sum = torch.zeros(n_models, dtype=torch.float64, device=device)
            correct = torch.zeros(n_models, dtype=torch.float64, device=device)
            for start in range(0, n, batch_size):
                batch = {k: v[start : start + batch_size].to(device) for k, v in data.items()}
                loss, accuracy = batched(stacked, batch)  # [M, b] each
                loss_sum += loss.double().sum(1)
                correct += accuracy.double().sum(1)
            for m, (total, hits) in enumerate(
                zip(loss_sum.tolist(), correct.tolist(), strict=True)
            ):
                metrics = {"loss": total / n}
                if bundle.per_example_accuracy is not None:
                    metrics["accuracy"] = hits / n
                results[m][task] = metrics
    return results
