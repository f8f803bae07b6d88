"""Gradients at fixed parameters θ0: per example (batched), per linear map (captured), and summed.

Three ways to get what a sketch needs, cheapest last:

- ``per_example_gradients``: one gradient per example for any chosen parameters, with
  ``torch.func`` (``functional_call`` + ``vmap(grad)``) or, for modules ``vmap`` cannot
  trace (Hugging Face models), one ordinary backward per example. Memory ``B x D``.
- ``kronecker_sketch`` / ``linear_signals``: for linear maps (``nn.Linear`` and transformers'
  ``Conv1D``), the inputs ``x`` and output gradients ``δ`` from ONE ordinary forward and
  backward of the summed per-example loss. Per-example losses are independent (eval mode,
  no cross-example ops), so ``d(Σ_b ℓ_b)/d out_b`` is example ``b``'s own ``δ``. Parameters
  do not require grad during that pass: only activation gradients are computed, never a
  weight gradient.
- ``summed_gradient``: the ordinary gradient of ``Σ_b ℓ_b`` (for task residuals).

Which parameters and linear maps are sketched is decided by ``sketch_targets`` from
parameter globs (``sketch.params``) and module globs (``sketch.modules``,
``sketch.exclude_modules``).
"""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.func import grad, vmap

from grasp_cli.errors import ConfigError
from grasp_cli.models import ModelBundle, call_functional, call_module
from grasp_cli.sketch.projections import KroneckerProjector

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LinearSite:
    """A linear map sketched with Kronecker factors: module path, parameter names, sizes.

    ``weight`` may be a tied alias (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``):
    the site sketches the part of the gradient that flows through this map only.
    ``transposed``: the weight is stored ``[d_in, d_out]`` and applied as ``y = x W + b``
    (transformers' ``Conv1D``); the sketch is that of the equivalent ``nn.Linear`` with
    weight ``Wᵀ [d_out, d_in]``, so ``project_gradient`` transposes a weight gradient first.
    """

    module: str
    weight: str
    bias: str | None  # the bias parameter's name when it is sketched (as an input column of ones)
    d_in: int
    d_out: int
    transposed: bool = False


def conv1d_class() -> type | None:
    """transformers' ``Conv1D`` when transformers is loaded (an instance implies it is), else None."""
    loaded = sys.modules.get("transformers.pytorch_utils")
    return getattr(loaded, "Conv1D", None) if loaded is not None else None


def linear_shape(layer: nn.Module) -> tuple[int, int, bool] | None:
    """``(d_in, d_out, transposed)`` when ``layer`` is a linear map grasp can Kronecker-sketch."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features, False
    conv1d = conv1d_class()
    if conv1d is not None and isinstance(layer, conv1d):
        d_in, d_out = layer.weight.shape
        return int(d_in), int(d_out), True
    return None


def _site(path: str, layer: nn.Module, with_bias: bool) -> LinearSite:
    d_in, d_out, transposed = linear_shape(layer)  # type: ignore[misc]
    prefix = f"{path}." if path else ""
    bias = f"{prefix}bias" if with_bias and getattr(layer, "bias", None) is not None else None
    return LinearSite(path, f"{prefix}weight", bias, d_in, d_out, transposed)


def parameter_aliases(module: nn.Module) -> dict[str, str]:
    """Every parameter name, tied aliases included, -> its canonical name (the first one
    ``named_parameters`` gives), in module order."""
    canonical: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        aliases[name] = canonical.setdefault(id(param), name)
    return aliases


def select_parameters(module: nn.Module, globs: list[str]) -> list[str]:
    """Names of the parameters matching any of ``globs`` (fnmatch, case-sensitive), in module order.

    Tied aliases are names too (``lm_head.weight`` of GPT-2), so the result may hold two
    names of one tensor; ``canonical_names`` folds them. Empty ``globs`` selects every
    parameter once (canonical names). A glob that matches nothing is a config error.
    """
    aliases = parameter_aliases(module)
    if not globs:
        return list(dict.fromkeys(aliases.values()))
    for pattern in globs:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in aliases):
            names = list(aliases)
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ConfigError(
                f"sketch.params: {pattern!r} matches no parameter (parameters: {shown})"
            )
    return [name for name in aliases if any(fnmatch.fnmatchcase(name, p) for p in globs)]


def canonical_names(module: nn.Module, names: list[str]) -> list[str]:
    """``names`` with tied aliases replaced by their canonical name, each tensor once, in order."""
    aliases = parameter_aliases(module)
    return list(dict.fromkeys(aliases[name] for name in names))


def linear_sites(module: nn.Module, names: list[str]) -> list[LinearSite]:
    """The linear maps whose weight is among ``names`` (their bias joins if it is too)."""
    chosen = set(names)
    sites = []
    for path, layer in module.named_modules():
        if linear_shape(layer) is None:
            continue
        prefix = f"{path}." if path else ""
        if f"{prefix}weight" not in chosen:
            continue
        sites.append(_site(path, layer, f"{prefix}bias" in chosen))
    return sites


def _lineage(path: str) -> list[str]:
    """A module path and its ancestors' paths: ``a.b.c`` -> ``[a, a.b, a.b.c]`` (root: ``[""]``)."""
    parts = path.split(".") if path else [""]
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _matches(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(p, g) for p in _lineage(path) for g in patterns)


def _check_module_globs(module: nn.Module, globs: list[str], key: str) -> None:
    names = [path for path, _ in module.named_modules() if path]
    for pattern in globs:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            linear = [path for path, layer in module.named_modules() if linear_shape(layer)]
            shown = ", ".join(linear[:6]) + (", ..." if len(linear) > 6 else "")
            raise ConfigError(f"{key}: {pattern!r} matches no module (linear maps: {shown})")


def sketch_targets(
    module: nn.Module,
    params: list[str],
    modules: list[str],
    exclude_modules: list[str],
    kronecker: bool,
) -> tuple[list[LinearSite], list[str]]:
    """``(Kronecker sites, densely projected parameter names)`` chosen by the sketch globs.

    A module is *chosen* by ``modules`` when its path or an ancestor's matches a glob, and
    *excluded* when its path or an ancestor's matches an ``exclude_modules`` glob; empty
    ``modules`` chooses every module unless ``params`` is set (then ``params`` alone decide,
    as before module globs existed).

    - Kronecker: every chosen, non-excluded linear map (weight and bias), plus the linear maps
      whose weight ``params`` names; any other parameter ``params`` names is projected
      densely. A tensor may not be both (a tied embedding and its output map): config error.
    - Dense kinds: every parameter of a chosen, non-excluded module, plus those ``params``
      names, minus those under an excluded module; canonical names, each tensor once.

    Every glob must match something (a typo is an error, never an empty sketch).
    """
    _check_module_globs(module, modules, "sketch.modules")
    _check_module_globs(module, exclude_modules, "sketch.exclude_modules")
    by_module = bool(modules) or not params

    def excluded(path: str) -> bool:
        return bool(exclude_modules) and _matches(path, exclude_modules)

    def chosen(path: str) -> bool:
        return (not modules or _matches(path, modules)) and not excluded(path)

    def owner(name: str) -> str:  # the module a parameter belongs to
        return name.rpartition(".")[0]

    named = select_parameters(module, params) if params else []
    named = [n for n in named if not excluded(owner(n))]
    if not kronecker:
        picked = [n for n in parameter_aliases(module) if chosen(owner(n))] if by_module else []
        return [], canonical_names(module, picked + named)
    sites = [
        _site(path, layer, True)
        for path, layer in module.named_modules()
        if by_module and linear_shape(layer) is not None and chosen(path)
    ]
    if modules and not sites:
        raise ConfigError(
            f"sketch.modules {modules} chooses no linear map (nn.Linear or Conv1D) to sketch"
        )
    seen = {site.module for site in sites}
    sites += [site for site in linear_sites(module, named) if site.module not in seen]
    order = {path: i for i, (path, _) in enumerate(module.named_modules())}
    sites.sort(key=lambda site: order[site.module])
    covered = {n for site in sites for n in (site.weight, site.bias) if n is not None}
    dense = canonical_names(module, [n for n in named if n not in covered])
    _check_untied(module, sites, dense)
    return sites, dense


def _check_untied(module: nn.Module, sites: list[LinearSite], dense: list[str]) -> None:
    """A tensor sketched densely (its whole gradient) and as a linear map (the map's part of
    it) would be counted twice."""
    params = dict(module.named_parameters(remove_duplicate=False))
    dense_ids = {id(params[name]): name for name in dense}
    for site in sites:
        for name in (site.weight, site.bias):
            if name is not None and id(params[name]) in dense_ids:
                raise ConfigError(
                    f"sketch: {dense_ids[id(params[name])]} and {name} are one tied tensor; sketch "
                    f"it densely (sketch.params) or as the linear map {site.module}, not both"
                )


def _outputs(bundle: ModelBundle, batch: Batch) -> torch.Tensor:
    return call_module(bundle.module, bundle.inputs(batch))


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
    method: str | None = None,
    scalar: Callable[[Any, Batch], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``{name: [B, *param.shape]}``: the gradient of each example's loss at the module's parameters.

    ``names`` are canonical parameter names (no tied aliases). ``method``: ``"vmap"`` runs
    each example as a batch of one inside ``vmap`` (``chunk_size`` bounds how many at once),
    ``"loop"`` runs one ordinary forward and backward per example (modules ``vmap`` cannot
    trace); default: the bundle's ``per_example``. Either way row ``b`` depends on example
    ``b`` alone. ``scalar(outputs, batch) -> [B]`` replaces the loss (TRAK's model output).
    """
    method = method or bundle.per_example
    if method == "loop":
        return _looped_gradients(bundle, names, batch, scalar)
    if method != "vmap":
        raise ValueError(f"per-example gradient method must be 'vmap' or 'loop', got {method!r}")
    module = bundle.module
    params = dict(module.named_parameters())
    chosen = {name: params[name].detach() for name in names}
    fixed = {name: p.detach() for name, p in params.items() if name not in chosen}
    buffers = dict(module.named_buffers())

    of_outputs = scalar or bundle.per_example_loss

    def loss_of_one(selected: dict[str, torch.Tensor], example: Batch) -> torch.Tensor:
        single = {key: value.unsqueeze(0) for key, value in example.items()}
        outputs = call_functional(module, (selected, fixed, buffers), bundle.inputs(single))
        return of_outputs(outputs, single).squeeze(0)

    return vmap(grad(loss_of_one), in_dims=(None, 0), chunk_size=chunk_size)(chosen, batch)


def _looped_gradients(
    bundle: ModelBundle,
    names: list[str],
    batch: Batch,
    scalar: Callable[[Any, Batch], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``per_example_gradients`` by one ordinary backward per example (batch of one each)."""
    of_outputs = scalar or bundle.per_example_loss
    params = dict(bundle.module.named_parameters())
    chosen = [params[name] for name in names]
    size = batch_size_of(batch)
    rows: list[tuple[torch.Tensor, ...]] = []
    with frozen_parameters(bundle.module), torch.enable_grad():
        for p in chosen:
            p.requires_grad_(True)
        for b in range(size):
            single = {key: value[b : b + 1] for key, value in batch.items()}
            loss = _check_losses(of_outputs(_outputs(bundle, single), single), 1)
            grads = torch.autograd.grad(loss.sum(), chosen, allow_unused=True)
            rows.append(
                tuple(
                    torch.zeros_like(p) if g is None else g
                    for p, g in zip(chosen, grads, strict=True)
                )
            )
    return {name: torch.stack([row[i] for row in rows]) for i, name in enumerate(names)}


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


def kronecker_sketch(
    bundle: ModelBundle, sites: list[LinearSite], batch: Batch, projector: KroneckerProjector
) -> torch.Tensor:
    """Per-example Kronecker sketches of the linear maps ``sites``, summed: float32 ``[B, k]``.

    The same numbers as ``project_io`` on ``linear_signals``, without keeping any layer's
    full inputs or output gradients: a forward hook keeps only ``P_in x̃ [B, T, kd]`` of
    each call, and a hook on the call's output turns its gradient into
    ``P_out δ [B, T, kd]`` and the layer's ``[B, k]`` contribution the moment the backward
    pass produces it. Peak memory is the model's own activations plus ``2 kd`` numbers per
    position and call, not ``d_in + d_out``.

    One forward and one backward of ``Σ_b ℓ_b`` with all parameters frozen; outputs of
    calls whose input needs no gradient (the first linear maps) are made leaves, and the
    backward pass runs from the loss to those leaves, so it reaches every sketched call
    the loss depends on (a call it does not depend on contributes 0).
    """
    module = bundle.module
    layers = dict(module.named_modules())
    batch_size = batch_size_of(batch)
    device = next(iter(batch.values())).device
    phi = torch.zeros(batch_size, projector.k, device=device, dtype=torch.float32)
    leaves: list[torch.Tensor] = []

    def make_hook(site: LinearSite):
        with_bias = site.bias is not None
        d_in = site.d_in + int(with_bias)

        def hook(
            layer: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor
        ) -> torch.Tensor | None:
            x = args[0] if args else next(iter(kwargs.values()))  # the layer's one input
            x_proj = projector.project_inputs(site.module, x.detach(), site.d_out, with_bias)
            replaced = None
            if not output.requires_grad:
                replaced = output = output.detach().requires_grad_(True)
                leaves.append(output)

            def on_gradient(delta: torch.Tensor) -> None:
                delta_proj = projector.project_deltas(site.module, delta, d_in)
                phi.add_(projector.combine(site.module, x_proj, delta_proj))

            output.register_hook(on_gradient)
            return replaced

        return hook

    handles = [
        layers[site.module].register_forward_hook(make_hook(site), with_kwargs=True)
        for site in sites
    ]
    try:
        with frozen_parameters(module), torch.enable_grad():
            losses = _check_losses(
                bundle.per_example_loss(_outputs(bundle, batch), batch), batch_size
            )
            if leaves:
                torch.autograd.grad(losses.sum(), leaves, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    return phi


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
