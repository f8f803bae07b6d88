"""The sketcher: per-example gradient sketches ``φ_i = P ∇θ ℓ(z_i; θ0)`` and task residuals.

``P`` is fixed by ``(projection kind, k, seed, parameter names, kron_dim, sjlt_nnz)`` and
regenerated from them (see ``projections``). Row ``i`` of a sketch depends on example
``i`` alone, never on the rest of its batch, so sketching a corpus in shards gives the
same numbers as sketching it in one go.

Kronecker kind: the ``nn.Linear`` layers among the selected parameters (with empty
``sketch.params``: every ``nn.Linear`` layer, weight and bias, and nothing else) are
sketched from their captured inputs and output gradients; any other selected parameter
(an embedding, a LayerNorm, a convolution) falls back to the dense Gaussian projection of
its per-example gradient, which needs a per-example (``vmap``) backward pass and costs
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
    linear_signals,
    linear_sites,
    per_example_gradients,
    select_parameters,
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
    for kronecker).
    """

    projection: str = "kronecker"
    k: int = 256
    kron_dim: int = 16
    sjlt_nnz: int = 4
    params: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def of(cls, source: Any) -> SketchSettings:
        """From any object with these attributes (e.g. the ``[sketch]`` config section)."""
        return cls(
            projection=str(source.projection),
            k=int(source.k),
            kron_dim=int(source.kron_dim),
            sjlt_nnz=int(source.sjlt_nnz),
            params=tuple(source.params),
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

    def __init__(self, bundle: ModelBundle, settings: Any, seed: int, device: str = "cpu") -> None:
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

        self.sites: list[LinearSite] = []
        if self.kind == "kronecker":
            if section.kron_dim <= 0:
                raise ConfigError("sketch.kron_dim must be positive")
            if section.params:
                self.param_names = select_parameters(module, section.params)
                self.sites = linear_sites(module, self.param_names)
            else:
                self.sites = linear_sites(module, select_parameters(module, []))
                if not self.sites:
                    raise ConfigError(
                        "sketch.projection = 'kronecker' found no nn.Linear layer in the model: "
                        "set sketch.params or use projection = 'gaussian'"
                    )
                self.param_names = [
                    n for s in self.sites for n in (s.weight, s.bias) if n is not None
                ]
            in_sites = {n for s in self.sites for n in (s.weight, s.bias) if n is not None}
            self.dense_names = [n for n in self.param_names if n not in in_sites]
            self.kronecker = KroneckerProjector(section.kron_dim, section.k, seed, self.device)
            self.projector: DenseProjector | SparseProjector = DenseProjector(
                "gaussian", section.k, seed, self.device
            )
        else:
            self.param_names = select_parameters(module, list(section.params))
            self.dense_names = list(self.param_names)
            if self.kind == "sjlt":
                if section.sjlt_nnz <= 0:
                    raise ConfigError("sketch.sjlt_nnz must be positive")
                self.projector = SparseProjector(section.k, section.sjlt_nnz, seed, self.device)
            else:
                self.projector = DenseProjector(self.kind, section.k, seed, self.device)
        if not self.param_names:
            raise ConfigError("sketch.params selects no parameters")

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
        self.bundle.module.eval()
        batch = self._to_device(batch)
        size = next(iter(batch.values())).shape[0]
        phi = torch.zeros(size, self.k, device=self.device)
        if self.sites:
            signals = linear_signals(self.bundle, self.sites, batch)
            for site in self.sites:
                for inputs, deltas in signals[site.module]:
                    phi += self.kronecker.project_io(
                        site.module, inputs, deltas, site.bias is not None
                    )
            del signals
        if self.dense_names:
            grads = per_example_gradients(self.bundle, self.dense_names, batch)
            for name in self.dense_names:
                phi += self.projector.project(name, self._flat(grads[name]))
        return phi.cpu().numpy().astype(np.float32, copy=False)

    def project_gradient(self, gradient: dict[str, torch.Tensor]) -> np.ndarray:
        """``P g`` for one full gradient ``{name: tensor shaped like the parameter}``: float32 ``[k]``.

        The same ``P`` as ``sketch_batch``: a Kronecker layer's weight gradient ``G`` (with
        its bias gradient as a last column) is mapped to ``Q_layer vec(P_out G P_inᵀ)``.
        """
        out = torch.zeros(self.k, device=self.device)
        for site in self.sites:
            matrix = gradient[site.weight].to(self.device).float()
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

        Gradients are summed over batches and divided by the total number of examples,
        so batches of any sizes give the mean over examples.
        """
        self.bundle.module.eval()
        total: dict[str, torch.Tensor] = {}
        count = 0
        for batch in batches:
            summed, size = summed_gradient(self.bundle, self.param_names, self._to_device(batch))
            for name, value in summed.items():
                total[name] = total[name] + value if name in total else value
            count += size
        if count == 0:
            raise ValueError("task_residual needs at least one example")
        mean = {name: value / count for name, value in total.items()}
        return -self.project_gradient(mean)

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
            "dense_params": list(self.dense_names),
            "sjlt_nnz": self.projector.nnz if isinstance(self.projector, SparseProjector) else None,
            "block_cols": BLOCK_COLS,
            "generator": GENERATOR,
            "scale": "entries of P have variance 1/k; a k' prefix is a JL sketch whose inner "
            "products are k'/k times the full ones (the surrogate fits scale-free, so no rescale)",
            "num_params": int(
                sum(
                    dict(self.bundle.module.named_parameters())[n].numel() for n in self.param_names
                )
            ),
        }
