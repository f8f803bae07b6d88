"""TRAK's features at θ0, faithfully (Park et al., 2023, "TRAK: Attributing Model Behavior at Scale").

For each training example ``z_i``, TRAK projects the per-example gradient of the *model
output* ``f`` (not of the loss) with a dense Gaussian JL map ``P`` of all parameters:

    ψ_i = P ∇θ f(z_i; θ0) ∈ R^k,        Q_i = ∂ℓ/∂f (up to sign): the out-to-loss weight,

with ``f`` the margin ``log(p/(1−p))`` (classifiers: of the label; LMs: summed over the
next-token positions) and ``Q = 1 − p`` (LMs: its mean over positions); see
``ModelBundle.model_output``. For a target task ``t`` the projected gradient of its mean
output, ``ψ_t = P ∇θ mean_{z∈t} f(z; θ0)``. TRAK's score of example ``i`` for task ``t`` is

    τ_ti = Q_i · ψ_iᵀ (ΨᵀΨ + λI)⁻¹ ψ_t            (Ψ = [ψ_1 … ψ_N]ᵀ, unweighted),

and a subset's score is the sum (or mean) of its examples' scores. This module computes
``ψ_i``, ``Q_i`` and ``ψ_t``; the kernel and the scores live in ``surrogate/`` (the same pass
over the corpus serves GRASP's own features). ``P`` is regenerated from its seed block by
block like every other projection (``projections.DenseProjector``), so TRAK's features cost
one vmapped per-example backward pass plus a ``D × k`` projection per batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from grasp_cli.errors import ConfigError
from grasp_cli.models import ModelBundle, call_module
from grasp_cli.sketch.gradients import (
    Batch,
    frozen_parameters,
    per_example_gradients,
    select_parameters,
)
from grasp_cli.sketch.projections import BLOCK_COLS, GENERATOR, DenseProjector


class TrakFeaturizer:
    """``ψ_i``, ``Q_i`` of corpus examples and ``ψ_t`` of tasks at the bundle's parameters (θ0).

    k: projection dimension; seed: the projection's seed; params: parameter-name globs
    (empty: all parameters, TRAK's default); device: where gradients are computed.
    """

    def __init__(
        self,
        bundle: ModelBundle,
        k: int,
        seed: int,
        params: Iterable[str] = (),
        device: str = "cpu",
        cache_bytes: int = 1 << 31,
    ) -> None:
        if bundle.model_output is None:
            raise ConfigError(
                "the faithful TRAK baseline needs the model's output function "
                "(ModelBundle.model_output); set sketch.trak_k = 0 for this model"
            )
        if k <= 0:
            raise ConfigError(f"sketch.trak_k = {k} must be positive (0 turns TRAK off)")
        self.bundle = bundle
        self.k, self.seed = int(k), int(seed)
        self.device = torch.device(device)
        bundle.module.to(self.device).eval()
        self.names = select_parameters(bundle.module, list(params))
        self.projector = DenseProjector("gaussian", self.k, self.seed, self.device, cache_bytes)

    def _output(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.bundle.model_output(outputs, batch)[0]

    def _project(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        size = next(iter(grads.values())).shape[0]
        out = torch.zeros(size, self.k, device=self.device)
        for name in self.names:
            out += self.projector.project(name, grads[name].reshape(size, -1))
        return out

    def featurize(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        """``(ψ [B, k] float32, Q [B] float32)`` for the examples of ``batch``."""
        self.bundle.module.eval()
        batch = {key: value.to(self.device) for key, value in batch.items()}
        grads = per_example_gradients(self.bundle, self.names, batch, scalar=self._output)
        psi = self._project(grads)
        with torch.no_grad():
            outputs = call_module(self.bundle.module, self.bundle.inputs(batch))
            q = self.bundle.model_output(outputs, batch)[1]
        return (
            psi.cpu().numpy().astype(np.float32, copy=False),
            q.detach().cpu().numpy().astype(np.float32, copy=False),
        )

    def task_direction(self, batches: Iterable[Batch]) -> np.ndarray:
        """``ψ_t = P ∇θ mean_z f(z)`` over all examples of ``batches``: float32 ``[k]``."""
        module = self.bundle.module
        module.eval()
        params = dict(module.named_parameters())
        chosen = [params[name] for name in self.names]
        total = [torch.zeros_like(p) for p in chosen]
        count = 0
        for batch in batches:
            batch = {key: value.to(self.device) for key, value in batch.items()}
            with frozen_parameters(module), torch.enable_grad():
                for p in chosen:
                    p.requires_grad_(True)
                outputs = call_module(module, self.bundle.inputs(batch))
                value = self._output(outputs, batch).sum()
                grads = torch.autograd.grad(value, chosen, allow_unused=True)
            for acc, g in zip(total, grads, strict=True):
                if g is not None:
                    acc += g.detach()
            count += next(iter(batch.values())).shape[0]
        if count == 0:
            raise ValueError("task_direction needs at least one example")
        mean = {name: g.reshape(1, -1) / count for name, g in zip(self.names, total, strict=True)}
        return self._project(mean)[0].cpu().numpy().astype(np.float32, copy=False)

    def describe(self) -> dict[str, Any]:
        return {
            "projection": "gaussian",
            "k": self.k,
            "seed": self.seed,
            "output": "margin log(p/(1-p)) (LMs: summed over next-token positions)",
            "weight": "Q = 1 - p (LMs: mean over positions)",
            "params": list(self.names),
            "block_cols": BLOCK_COLS,
            "generator": GENERATOR,
        }
