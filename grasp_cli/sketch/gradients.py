"""Gradients at fixed parameters θ0: per example (batched), per linear layer (captured), and summed.

Three ways to get what a sketch needs, cheapest last:

- ``per_example_gradients``: ``torch.func`` (``functional_call`` + ``vmap(grad)``), one
  gradient per example for any chosen parameters. Memory ``B x D``.
- ``linear_signals``: for ``nn.Linear`` layers, the inputs ``x`` and output gradients ``δ``
  from ONE ordinary forward and backward of the summed per-example loss. Per-example losses
  are independent (eval mode, no cross-example ops), so ``d(Σ_b ℓ_b)/d out_b`` is example
  ``b``'s own ``δ``. Parameters do not require grad during that pass: only activation
  gradients are computed, never a weight gradient.
- ``summed_gradient``: the ordinary gradient of ``Σ_b ℓ_b`` (for task residuals).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap

from grasp_cli.errors import ConfigError
from grasp_cli.models import ModelBundle

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LinearSite:
    """A linear layer sketched with Kronecker factors: module path, parameter names, sizes."""

    module: str
    weight: str
    bias: str | None  # the bias parameter's name when it is sketched (as an input column of ones)
    d_in: int
    d_out: int


def select_parameters(module: nn.Module, globs: list[str]) -> list[str]:
    """Names of the parameters matching any of ``globs`` (fnmatch, case-sensitive), in module order.

    Empty ``globs`` selects every parameter. A glob that matches nothing is a config error.
    """
    names = [name for name, _ in module.named_parameters()]
    if not globs:
        return names
    for pattern in globs:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ConfigError(
                f"sketch.params: {pattern!r} matches no parameter (parameters: {shown})"
            )
    return [name for name in names if any(fnmatch.fnmatchcase(name, p) for p in globs)]


def linear_sites(module: nn.Module, names: list[str]) -> list[LinearSite]:
    """The ``nn.Linear`` layers whose weight is among ``names`` (their bias joins if it is too)."""
    chosen = set(names)
    sites = []
    for path, layer in module.named_modules():
        if not isinstance(layer, nn.Linear):
            continue
        prefix = f"{path}." if path else ""
        if f"{prefix}weight" not in chosen:
            continue
        bias = f"{prefix}bias" if layer.bias is not None and f"{prefix}bias" in chosen else None
        sites.append(
            LinearSite(path, f"{prefix}weight", bias, layer.in_features, layer.out_features)
        )
    return sites


def _outputs(bundle: ModelBundle, batch: Batch) -> torch.Tensor:
    return bundle.module(*bundle.inputs(batch))


def _check_losses(losses: torch.Tensor, batch_size: int) -> torch.Tensor:
    if losses.shape != (batch_size,):
        raise ValueError(
            f"per_example_loss must return shape [{batch_size}], got {tuple(losses.shape)}"
        )
    return losses


def batch_size_of(batch: Batch) -> int:
    sizes = {value.shape[0] for value in batch.values()}
    if len(sizes) != 1:
        raise ValueError(f"batch tensors disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


def per_example_gradients(
    bundle: ModelBundle,
    names: list[str],
    batch: Batch,
    chunk_size: int | None = None,
    scalar: Callable[[torch.Tensor, Batch], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``{name: [B, *param.shape]}``: the gradient of each example's loss at the module's parameters.

    Each example runs as a batch of one inside ``vmap``, so row ``b`` depends on example ``b``
    alone. ``chunk_size`` bounds how many examples ``vmap`` runs at once (memory).
    ``scalar(outputs, batch) -> [1]`` replaces the loss (e.g. TRAK's model output).
    """
    module = bundle.module
    params = dict(module.named_parameters())
    chosen = {name: params[name].detach() for name in names}
    fixed = {name: p.detach() for name, p in params.items() if name not in chosen}
    buffers = dict(module.named_buffers())

    of_outputs = scalar or bundle.per_example_loss

    def loss_of_one(selected: dict[str, torch.Tensor], example: Batch) -> torch.Tensor:
        single = {key: value.unsqueeze(0) for key, value in example.items()}
        outputs = functional_call(module, (selected, fixed, buffers), bundle.inputs(single))
        return of_outputs(outputs, single).squeeze(0)

    return vmap(grad(loss_of_one), in_dims=(None, 0), chunk_size=chunk_size)(chosen, batch)


@contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """Temporarily set ``requires_grad = False`` on every parameter (restored afterwards)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def linear_signals(
    bundle: ModelBundle, sites: list[LinearSite], batch: Batch
) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """``{module path: [(x [B, ..., d_in], δ [B, ..., d_out]), ...]}``, one pair per call of the layer.

    One forward and one backward of ``Σ_b ℓ_b`` with all parameters frozen. A layer
    whose input does not require grad (the first linear layers) has its output made a
    leaf that does, so the backward pass runs from the loss down to the first sketched
    layer and computes only activation gradients. A layer called several times
    (shared weights) yields several pairs; its gradient is their sum. A layer the loss
    does not depend on yields zero ``δ``.
    """
    module = bundle.module
    records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {
        site.module: [] for site in sites
    }
    layers = dict(module.named_modules())
    handles = []

    def make_hook(path: str):
        def hook(layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)
            records[path].append((args[0].detach(), output))
            return output

        return hook

    batch_size = batch_size_of(batch)
    try:
        for site in sites:
            handles.append(layers[site.module].register_forward_hook(make_hook(site.module)))
        with frozen_parameters(module), torch.enable_grad():
            losses = _check_losses(
                bundle.per_example_loss(_outputs(bundle, batch), batch), batch_size
            )
            outputs = [out for pairs in records.values() for _, out in pairs]
            deltas = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    result: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    position = 0
    for path, pairs in records.items():
        result[path] = []
        for x, out in pairs:
            delta = deltas[position]
            position += 1
            result[path].append((x, torch.zeros_like(out) if delta is None else delta.detach()))
    return result


def summed_gradient(
    bundle: ModelBundle, names: list[str], batch: Batch
) -> tuple[dict[str, torch.Tensor], int]:
    """``({name: Σ_b ∇ℓ_b}, B)``: the ordinary gradient of the summed loss over the batch."""
    module = bundle.module
    params = dict(module.named_parameters())
    chosen = [params[name] for name in names]
    batch_size = batch_size_of(batch)
    with frozen_parameters(module), torch.enable_grad():
        for p in chosen:
            p.requires_grad_(True)
        losses = _check_losses(bundle.per_example_loss(_outputs(bundle, batch), batch), batch_size)
        grads = torch.autograd.grad(losses.sum(), chosen, allow_unused=True)
    summed = {
        name: (torch.zeros_like(p) if g is None else g.detach())
        for name, p, g in zip(names, chosen, grads, strict=True)
    }
    return summed, batch_size
