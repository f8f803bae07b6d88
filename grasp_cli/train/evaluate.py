"""Task metrics of a trained model: the measured utilities that ground the surrogate."""

from __future__ import annotations

import torch

from grasp_cli.models import ModelBundle, call_module
from grasp_cli.train.trainer import StateDict, initial_module, num_examples, resolve_device

Data = dict[str, torch.Tensor]


def evaluate_tasks(
    bundle: ModelBundle,
    state_dict: StateDict,
    tasks: dict[str, Data],
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of the model with weights ``state_dict`` on each task.

    ``tasks``: task name -> ``{key: tensor [n_t, ...]}``.
    Returns task -> {"loss": mean per-example loss over all n_t examples (nats),
    "accuracy": mean per-example accuracy (classifiers only)}. Runs in eval mode, no grad;
    ``bundle.module`` is not modified.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = resolve_device(bundle, device)
    model = initial_module(bundle, state_dict, device)
    model.eval()
    results: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for task, data in tasks.items():
            n = num_examples(data)
            if n == 0:
                raise ValueError(f"task {task!r} has no examples")
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.float64, device=device)
            for start in range(0, n, batch_size):
                batch = {k: v[start : start + batch_size].to(device) for k, v in data.items()}
                outputs = call_module(model, bundle.inputs(batch))
                loss_sum += bundle.per_example_loss(outputs, batch).double().sum()
                if bundle.per_example_accuracy is not None:
                    correct += bundle.per_example_accuracy(outputs, batch).double().sum()
            metrics = {"loss": loss_sum.item() / n}
            if bundle.per_example_accuracy is not None:
                metrics["accuracy"] = correct.item() / n
            results[task] = metrics
    return results
