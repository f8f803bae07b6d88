"""The sketcher: per-example gradient sketches ``φ_i = P ∇θ ℓ(z_i; θ0)`` and task residuals.

``P`` is fixed by ``(projection kind, k, seed, parameter names, kron_dim, sjlt_nnz)`` and
regenerated from them (see ``projections``). Row ``i`` of a sketch depends on example
``i`` alone, never on the rest of its batch, so sketching a corpus in shards gives the
same numbers as sketching it in one go.

Kronecker kind: the linear maps (``nn.Linear`` and transformers' ``Conv1D``) chosen by
``sketch.modules`` / ``sketch.exclude_modules`` / ``sketch.params`` (by default every linear
map, weight and bias, and nothing else) are sketched from their captured inputs and output
gradients; any other selected parameter (an embedding, a LayerNorm, a convolution) falls
back to the dense Gaussian projection of its per-example gradient, which needs a
per-example backward pass (``vmap``, or a loop for Hugging Face models) and costs
accordingly. The two parts are added: both are unbiased JL maps of disjoint coordinates.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from grasp_cli.errors import ConfigError
from grasp_cli.models import ModelBundle
from grasp_cli.sketch.gradients import (
    Batch,
    LinearSite,
    kronecker_sketch,
    parameter_aliases,
    per_example_gradients,
    sketch_targets,
    summed_gradient,
)
from grasp_cli.sketch.projections import (
    BLOCK_COLS,
    GENERATOR,
    KINDS,
    DenseProjector,
    KroneckerProjector,
    SparseProjector,
)

SKETCH_VERSION = 1


@dataclass(frozen=True)
class SketchSettings:
    """What defines the projection ``P`` (besides the seed): plain values, no CLI types.

    projection: 'gaussian' | 'rademacher' | 'sjlt' | 'kronecker'; k: sketch dimension;
    kron_dim: Kronecker per-side factor dimension; sjlt_nnz: SJLT non-zeros per coordinate;
    params: parameter-name globs (empty: all parameters for dense kinds, all linear layers
    for kronecker); modules / exclude_modules: module-name globs choosing (or removing)
    whole modules and everything under them.
    """

    projection: str = "kronecker"
    k: int = 256
    kron_dim: int = 16
    sjlt_nnz: int = 4
    params: tuple[str, ...] = field(default_factory=tuple)
    modules: tuple[str, ...] = field(default_factory=tuple)
    exclude_modules: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def of(cls, source: Any) -> SketchSettings:
        """From any object with these attributes (e.g. the ``[sketch]`` config section)."""
        return cls(
            projection=str(source.projection),
            k=int(source.k),
            kron_dim=int(source.kron_dim),
            sjlt_nnz=int(source.sjlt_nnz),
            params=tuple(source.params),
            modules=tuple(getattr(source, "modules", ())),
            exclude_modules=tuple(getattr(source, "exclude_modules", ())),
        )


class Sketcher:
    """Sketches gradients of one model at its current parameters θ0 with one seeded projection.

    The bundle's module is moved to ``device`` and put in eval mode (and kept there on each
    call): per-example gradients need examples that do not interact (no dropout, no
    batch statistics).

    >>> sketcher = Sketcher(bundle, SketchSettings(projection="kronecker", k=256), seed=7)
    >>> phi = sketcher.sketch_batch({"tokens": tokens})   # float32 [B, k]
    >>> r = sketcher.task_residual(task_batches)          # float32 [k]
    """

    def __init__(
        self,
        bundle: ModelBundle,
        settings: Any,
        seed: int,
        device: str = "cpu",
        cache_bytes: int = 1 << 31,
    ) -> None:
        section = settings if isinstance(settings, SketchSettings) else SketchSettings.of(settings)
        if section.projection not in KINDS:
            raise ConfigError(
                f"sketch.projection = {section.projection!r}: choose one of {', '.join(KINDS)}"
            )
        if seed < 0:
            raise ConfigError(
                f"sketch seed must be >= 0 (resolve -1 from run.seed first), got {seed}"
            )
        self.bundle = bundle
        self.kind = section.projection
        self.seed = seed
        self.device = torch.device(device)
        self._k = section.k
        self.kron_dim = section.kron_dim
        self.sjlt_nnz = section.sjlt_nnz
        bundle.module.to(self.device).eval()
        module = bundle.module

        kronecker = self.kind == "kronecker"
        if kronecker and section.kron_dim <= 0:
            raise ConfigError("sketch.kron_dim must be positive")
        self.sites: list[LinearSite]
        self.sites, self.dense_names = sketch_targets(
            module,
            list(section.params),
            list(section.modules),
            list(section.exclude_modules),
            kronecker,
        )
        if kronecker and not self.sites and not section.params and not section.modules:
            raise ConfigError(
                "sketch.projection = 'kronecker' found no linear map (nn.Linear, Conv1D) in the "
                "model: set sketch.params or use projection = 'gaussian'"
            )
        chosen = {n for s in self.sites for n in (s.weight, s.bias) if n is not None}
        chosen.update(self.dense_names)
        self.param_names = [n for n in parameter_aliases(module) if n in chosen]
        if kronecker:
            self.kronecker = KroneckerProjector(section.kron_dim, section.k, seed, self.device)
            self.projector: DenseProjector | SparseProjector = DenseProjector(
                "gaussian", section.k, seed, self.device, cache_bytes
            )
        elif self.kind == "sjlt":
            if section.sjlt_nnz <= 0:
                raise ConfigError("sketch.sjlt_nnz must be positive")
            self.projector = SparseProjector(
                section.k, section.sjlt_nnz, seed, self.device, cache_bytes
            )
        else:
            self.projector = DenseProjector(self.kind, section.k, seed, self.device, cache_bytes)
        if not self.param_names:
            raise ConfigError("sketch.params selects no parameters")

    def num_params(self) -> int:
        """Parameters the sketch covers (a tied tensor counts once)."""
        params = dict(self.bundle.module.named_parameters(remove_duplicate=False))
        unique = {id(params[n]): params[n].numel() for n in self.param_names}
        return int(sum(unique.values()))

    @property
    def k(self) -> int:
        """Sketch dimension."""
        return self._k

    def _to_device(self, batch: Batch) -> Batch:
        return {key: value.to(self.device) for key, value in batch.items()}

    def _flat(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(tensor.shape[0], -1)

    def sketch_batch(self, batch: Batch) -> np.ndarray:
        """``φ_i = P ∇θ ℓ(z_i; θ0)`` for every example of ``batch``: float32 ``[B, k]``."""
        return self._sketch(batch).cpu().numpy().astype(np.float32, copy=False)

    def _sketch(self, batch: Batch) -> torch.Tensor:
        self.bundle.module.eval()
        batch = self._to_device(batch)
        size = next(iter(batch.values())).shape[0]
        phi = torch.zeros(size, self.k, device=self.device)
        if self.sites:
            phi += kronecker_sketch(self.bundle, self.sites, batch, self.kronecker)
        if self.dense_names:
            grads = per_example_gradients(self.bundle, self.dense_names, batch)
            for name in self.dense_names:
                phi += self.projector.project(name, self._flat(grads[name]))
        return phi

    def project_gradient(self, gradient: dict[str, torch.Tensor]) -> np.ndarray:
        """``P g`` for one full gradient ``{name: tensor shaped like the parameter}``: float32 ``[k]``.

        The same ``P`` as ``sketch_batch``: a Kronecker layer's weight gradient ``G`` (stored
        ``[d_out, d_in]``; a ``Conv1D``'s ``[d_in, d_out]`` is transposed first), with its bias
        gradient as a last column, is mapped to ``Q_layer vec(P_out G P_inᵀ)``. ``gradient``
        holds, for each site, the gradient through that map alone (what matters for tied
        weights) under the site's weight name.
        """
        out = torch.zeros(self.k, device=self.device)
        for site in self.sites:
            matrix = gradient[site.weight].to(self.device).float()
            if site.transposed:
                matrix = matrix.T
            if site.bias is not None:
                matrix = torch.cat(
                    [matrix, gradient[site.bias].to(self.device).float()[:, None]], dim=1
                )
            out += self.kronecker.project_gradient(site.module, matrix)
        for name in self.dense_names:
            out += self.projector.project(name, gradient[name].to(self.device).reshape(1, -1))[0]
        return out.cpu().numpy().astype(np.float32, copy=False)

    def task_residual(self, batches: Iterable[Batch]) -> np.ndarray:
        """``r_t = −P ∇θ L_t(θ0)``: float32 ``[k]``, ``L_t`` the mean per-example loss over all batches.

        ``P`` is linear, so ``P ∇L_t`` is the mean of the examples' sketches: the Kronecker
        part is summed from the same captured signals as ``sketch_batch`` (each linear map's
        own share of the gradient, also for tied weights), the dense part projects the
        ordinary summed gradient once per batch. Batches of any sizes give the mean over
        examples.
        """
        self.bundle.module.eval()
        total = torch.zeros(self.k, device=self.device, dtype=torch.float64)
        dense: dict[str, torch.Tensor] = {}
        count = 0
        for batch in batches:
            batch = self._to_device(batch)
            if self.sites:
                phi = kronecker_sketch(self.bundle, self.sites, batch, self.kronecker)
                total += phi.double().sum(0)
            if self.dense_names:
                summed, _ = summed_gradient(self.bundle, self.dense_names, batch)
                for name, value in summed.items():
                    dense[name] = dense[name] + value if name in dense else value
            count += next(iter(batch.values())).shape[0]
        if count == 0:
            raise ValueError("task_residual needs at least one example")
        mean = (total / count).float()
        for name, value in dense.items():
            flat = (value / count).to(self.device).reshape(1, -1)
            mean += self.projector.project(name, flat)[0]
        return (-mean).cpu().numpy().astype(np.float32, copy=False)

    def describe(self) -> dict[str, Any]:
        """What defines ``P`` (for the artifact's attributes; equal descriptions mean equal sketches)."""
        return {
            "version": SKETCH_VERSION,
            "projection": self.kind,
            "k": self.k,
            "seed": self.seed,
            "params": list(self.param_names),
            "kron_dim": self.kron_dim if self.kind == "kronecker" else None,
            "kron_layers": [site.module for site in self.sites],
            "kron_transposed": [site.module for site in self.sites if site.transposed],
            "dense_params": list(self.dense_names),
            "sjlt_nnz": self.projector.nnz if isinstance(self.projector, SparseProjector) else None,
            "block_cols": BLOCK_COLS,
            "generator": GENERATOR,
            "scale": "entries of P have variance 1/k; a k' prefix is a JL sketch whose inner "
            "products are k'/k times the full ones (the surrogate fits scale-free, so no rescale)",
            "num_params": self.num_params(),
        }
