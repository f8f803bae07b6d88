"""The one trainer: the reference model θ0 and every retrained subset go through ``train``.

A run is a fixed number of AdamW steps whatever the subset size (fixed compute), with
linear warm-up, cosine decay and gradient clipping. Batches are drawn uniformly with
replacement from the subset, and the draws come from a generator seeded by ``seed``
alone: step ``t`` draws positions ``u ∈ [0, 1)^B`` and takes ``indices[floor(u · |S|)]``
of the subset's sorted indices. Two subsets trained with the same seed therefore share
one random stream (common random numbers), so the difference between their losses is
mostly the difference between their data, not the noise of training.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from grasp_cli.config import AUTO_STEPS, DEFAULT_REFERENCE_STEPS
from grasp_cli.models import ModelBundle, call_module
from grasp_cli.progress import Progress

Data = dict[str, torch.Tensor]
StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TrainRecipe:
    """How one model is trained. ``lr`` is the peak; the schedule ends at ``min_lr_ratio · lr``."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0  # max global L2 norm of the gradient (<= 0: no clipping)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError(
                f"steps and batch_size must be positive, got {self.steps}, {self.batch_size}"
            )
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("lr must be positive; weight_decay and warmup_steps non-negative")

    @classmethod
    def from_section(cls, section: Any) -> TrainRecipe:
        """From a ``ReferenceSection`` or ``RetrainSection`` (anything with the same five fields).

        ``steps = -1`` (a reference section's "the model kind's default", unresolved) is the
        default number of training steps: a recipe is only asked for when θ0 is trained.
        """
        steps = int(section.steps)
        return cls(
            steps=DEFAULT_REFERENCE_STEPS if steps == AUTO_STEPS else steps,
            batch_size=int(section.batch_size),
            lr=float(section.lr),
            weight_decay=float(section.weight_decay),
            warmup_steps=int(section.warmup_steps),
        )

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine decay."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        decay_steps = max(1, self.steps - self.warmup_steps - 1)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        floor = self.min_lr_ratio * self.lr
        return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.lr - floor)


@dataclass
class TrainResult:
    """A trained model. ``state_dict`` lives on the training device; ``losses`` is the
    mean training loss of each step's batch, ``[steps]``; ``final_loss = losses[-1]``."""

    state_dict: StateDict
    final_loss: float
    wall_s: float
    steps: int
    losses: np.ndarray


def num_examples(data: Data) -> int:
    """N, the leading dimension shared by every tensor of ``data``."""
    if not data:
        raise ValueError("data has no tensors")
    sizes = {key: int(value.shape[0]) for key, value in data.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"data tensors disagree on the number of examples: {sizes}")
    return next(iter(sizes.values()))


def check_indices(indices: np.ndarray, n_examples: int) -> np.ndarray:
    """The subset as sorted, unique int64 row indices into ``data``; raises on empty or out of range."""
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size > 1 and not (indices[1:] > indices[:-1]).all():  # sorted unique: no copy
        indices = np.unique(indices)
    if indices.size == 0:
        raise ValueError("cannot train on an empty subset")
    if indices[0] < 0 or indices[-1] >= n_examples:
        raise ValueError(
            f"subset indices must lie in [0, {n_examples}), got {indices[0]}..{indices[-1]}"
        )
    return indices


def batch_rows(indices: np.ndarray, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """Rows of ``data`` used at each step, ``[steps, batch_size]`` int64.

    ``indices`` must be sorted (see ``check_indices``). The uniform draws depend on
    ``seed`` only, never on the subset, which is what makes the stream common.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    draws = np.random.Generator(np.random.PCG64(seed)).random((steps, batch_size))
    positions = np.minimum((draws * indices.size).astype(np.int64), indices.size - 1)
    return indices[positions]


def gather(data: Data, rows: np.ndarray, device: torch.device) -> Data:
    """The batch ``{key: tensor[rows]}`` on ``device`` (``rows`` may have any shape)."""
    index = torch.from_numpy(rows)
    return {key: value[index].to(device, non_blocking=True) for key, value in data.items()}


def resolve_device(bundle: ModelBundle, device: str | torch.device | None) -> torch.device:
    """``device`` if given ('auto' picks CUDA when present), else where the bundle's module lives."""
    if device is None:
        first = next(bundle.module.parameters(), None)
        return first.device if first is not None else torch.device("cpu")
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def initial_module(
    bundle: ModelBundle, init_state: StateDict | None, device: torch.device
) -> nn.Module:
    """A private copy of the bundle's module holding ``init_state`` (θ0), or its own fresh init."""
    module = copy.deepcopy(bundle.module)
    if init_state is not None:
        module.load_state_dict(init_state)
    return module.to(device)


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay applies to matrices and embeddings, not to biases or norm scales."""
    return param.dim() >= 2


@contextmanager
def seeded_torch(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's own RNG (dropout in plugin models) without disturbing the caller's."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def train(
    bundle: ModelBundle,
    data: Data,
    indices: np.ndarray,
    recipe: TrainRecipe,
    seed: int,
    init_state: StateDict | None = None,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> TrainResult:
    """Train a copy of ``bundle.module`` on the rows ``indices`` of ``data`` for ``recipe.steps`` steps.

    ``data``: the corpus, ``{key: tensor [N, ...]}`` (kept where it is; batches are moved).
    ``indices``: row indices of the subset S (any order; duplicates ignored).
    ``init_state``: θ0 to continue from; ``None`` starts from the bundle's own (fresh) weights.
    ``bundle.module`` itself is never modified. Same inputs give a bit-identical state on CPU.
    """
    device = resolve_device(bundle, device)
    indices = check_indices(indices, num_examples(data))
    rows = batch_rows(indices, recipe.steps, recipe.batch_size, seed)
    start = time.perf_counter()
    with seeded_torch(seed, device):
        model = initial_module(bundle, init_state, device)
        model.train()
        named = list(model.named_parameters())
        groups = [
            {"params": [p for n, p in named if decays(n, p)], "weight_decay": recipe.weight_decay},
            {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=recipe.lr, betas=recipe.betas, eps=recipe.eps
        )
        params = [p for _, p in named]
        losses = torch.empty(recipe.steps, dtype=torch.float32, device=device)
        bar = Progress(recipe.steps, "train", unit="steps", enabled=progress)
        for step in range(recipe.steps):
            lr = recipe.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = gather(data, rows[step], device)
            loss = bundle.per_example_loss(call_module(model, bundle.inputs(batch)), batch).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
            optimizer.step()
            losses[step] = loss.detach()
            bar.update()
        bar.close()
    state = {key: value.detach() for key, value in model.state_dict().items()}
    loss_values = losses.cpu().numpy().astype(np.float64)
    return TrainResult(
        state, float(loss_values[-1]), time.perf_counter() - start, recipe.steps, loss_values
    )
