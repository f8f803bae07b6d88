"""Built-in models and the plugin hook.

A ``ModelBundle`` is everything the sketcher and the trainer need to know about a
model: the module, how to turn a batch into its inputs, and the per-example loss
of its outputs. Keeping ``inputs`` and ``per_example_loss`` separate from the module
lets ``torch.func.functional_call`` run the same model with other parameters
(per-example gradients, several models trained at once).

Batches are dicts of tensors: ``{"tokens": int64 [B, L+1]}`` for language models,
``{"image": uint8 [B, H, W(, C)], "label": int64 [B]}`` for classifiers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from grasp_cli.config import ModelSection
from grasp_cli.errors import ConfigError
from grasp_cli.models.transformer import (
    ByteTransformer,
    TransformerShape,
    lm_inputs,
    lm_margin_output,
    lm_per_example_loss,
)
from grasp_cli.models.vision import (
    CNN,
    MLP,
    classifier_margin_output,
    classifier_per_example_accuracy,
    classifier_per_example_loss,
    image_inputs,
)

Batch = dict[str, torch.Tensor]


@dataclass
class ModelBundle:
    module: nn.Module
    inputs: Callable[[Batch], tuple[torch.Tensor, ...]]
    per_example_loss: Callable[[torch.Tensor, Batch], torch.Tensor]  # (outputs, batch) -> [B]
    per_example_accuracy: Callable[[torch.Tensor, Batch], torch.Tensor] | None = None
    kind: str = "lm"  # "lm" or "classifier"
    # TRAK's model output and out-to-loss weight, (outputs, batch) -> (f [B], Q [B]); None:
    # the faithful TRAK baseline is not available for this model.
    model_output: Callable[[torch.Tensor, Batch], tuple[torch.Tensor, torch.Tensor]] | None = None

    def loss(self, batch: Batch) -> torch.Tensor:
        """Per-example loss ``[B]`` with the module's own parameters."""
        return self.per_example_loss(self.module(*self.inputs(batch)), batch)


@dataclass(frozen=True)
class DataShape:
    """What a model must know about the data: sequence length, or image shape and classes."""

    seq_len: int = 0
    image_shape: tuple[int, ...] = ()
    num_classes: int = 0


def build_model(section: ModelSection, data: DataShape, seed: int) -> ModelBundle:
    """A freshly initialized model (seeded) for the configured kind."""
    torch.manual_seed(seed)
    if section.kind == "transformer":
        if data.seq_len <= 0:
            raise ConfigError(
                "model.kind = 'transformer' needs a token corpus (prepare a text corpus)"
            )
        if section.d_model % section.n_head:
            raise ConfigError("model.d_model must be divisible by model.n_head")
        shape = TransformerShape(section.n_layer, section.n_head, section.d_model, data.seq_len)
        return ModelBundle(
            ByteTransformer(shape), lm_inputs, lm_per_example_loss, None, "lm", lm_margin_output
        )
    if section.kind in ("mlp", "cnn"):
        if not data.image_shape or data.num_classes <= 0:
            raise ConfigError(f"model.kind = '{section.kind}' needs an image corpus with labels")
        if section.kind == "mlp":
            module: nn.Module = MLP(data.image_shape, data.num_classes, section.hidden)
        else:
            module = CNN(data.image_shape, data.num_classes, section.channels)
        return ModelBundle(
            module,
            image_inputs,
            classifier_per_example_loss,
            classifier_per_example_accuracy,
            "classifier",
            classifier_margin_output,
        )
    return _load_plugin(section, data)


def _load_plugin(section: ModelSection, data: DataShape) -> ModelBundle:
    """Import ``package.module:function`` (only from the explicit config key) and call it."""
    module_name, _, attr = section.factory.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"model.factory = {section.factory!r} cannot be imported: {exc}"
        ) from None
    result = factory(dict(section.options), data)
    if isinstance(result, ModelBundle):
        return result
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module):
        module, loss = result
        return ModelBundle(module, lm_inputs if data.seq_len else image_inputs, loss)
    raise ConfigError(
        f"model.factory {section.factory!r} must return a ModelBundle or (module, per_example_loss)"
    )
