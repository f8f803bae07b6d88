"""Built-in models and the plugin hook.

A ``ModelBundle`` is everything the sketcher and the trainer need to know about a
model: the module, how to turn a batch into its inputs, and the per-example loss
of its outputs. Keeping ``inputs`` and ``per_example_loss`` separate from the module
lets ``torch.func.functional_call`` run the same model with other parameters
(per-example gradients, several models trained at once).

Batches are dicts of tensors: ``{"tokens": int64 [B, L+1]}`` for language models,
``{"image": uint8 [B, H, W(, C)], "label": int64 [B]}`` for classifiers. ``inputs`` returns
positional arguments (a tuple) or keyword arguments (a dict, as Hugging Face models take
them: their positional order differs between architectures); ``call_module`` and
``call_functional`` apply either form.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from grasp_cli.config import ModelSection
from grasp_cli.errors import ConfigError, InputError
from grasp_cli.models.transformer import (
    PAD_ID,
    VOCAB_SIZE,
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
Inputs = tuple[torch.Tensor, ...] | Mapping[str, Any]


def call_module(module: nn.Module, inputs: Inputs) -> Any:
    """``module(*inputs)`` for a tuple, ``module(**inputs)`` for a mapping of keyword arguments."""
    if isinstance(inputs, Mapping):
        return module(**inputs)
    return module(*inputs)


def call_functional(module: nn.Module, params: Any, inputs: Inputs) -> Any:
    """``torch.func.functional_call`` of ``module`` with ``params`` on positional or keyword inputs."""
    from torch.func import functional_call

    if isinstance(inputs, Mapping):
        return functional_call(module, params, (), dict(inputs))
    return functional_call(module, params, tuple(inputs))


@dataclass
class ModelBundle:
    """A module with its input and loss functions.

    ``per_example``: how per-example gradients of arbitrary parameters are taken (dense
    projections): ``"vmap"`` (``torch.func``, all examples at once) or ``"loop"`` (one
    ordinary backward per example, for modules ``vmap`` cannot trace, such as Hugging Face
    models whose mask code branches on tensor values). ``vocab_size``: the number of token
    ids a language model accepts (None: not a token model or unknown).
    """

    module: nn.Module
    inputs: Callable[[Batch], Inputs]
    per_example_loss: Callable[[Any, Batch], torch.Tensor]  # (outputs, batch) -> [B]
    per_example_accuracy: Callable[[Any, Batch], torch.Tensor] | None = None
    kind: str = "lm"  # "lm" or "classifier"
    # TRAK's model output and out-to-loss weight, (outputs, batch) -> (f [B], Q [B]); None:
    # the faithful TRAK baseline is not available for this model.
    model_output: Callable[[Any, Batch], tuple[torch.Tensor, torch.Tensor]] | None = None
    per_example: str = "vmap"
    vocab_size: int | None = None

    def loss(self, batch: Batch) -> torch.Tensor:
        """Per-example loss ``[B]`` with the module's own parameters."""
        return self.per_example_loss(call_module(self.module, self.inputs(batch)), batch)


@dataclass(frozen=True)
class DataShape:
    """What a model must know about the data: sequence length, or image shape and classes.

    Token corpora also give ``pad_id`` (the id that fills short rows and never counts in a
    loss: 256 for grasp's byte corpus, else the corpus manifest's ``pad_id``) and
    ``max_token_id``, the largest other id in the corpus and tasks (-1: not known), which a
    model's vocabulary must cover.
    """

    seq_len: int = 0
    image_shape: tuple[int, ...] = ()
    num_classes: int = 0
    pad_id: int = PAD_ID
    max_token_id: int = -1


def build_model(section: ModelSection, data: DataShape, seed: int) -> ModelBundle:
    """The configured model with its initial weights: a fresh seeded init for the built-in
    kinds, the checkpoint's weights for kind = 'hf', whatever the factory returns for plugins."""
    torch.manual_seed(seed)
    if section.kind == "hf":
        from grasp_cli.models.hf import load_hf_bundle

        return load_hf_bundle(section, data)
    if section.kind == "transformer":
        if data.seq_len <= 0:
            raise ConfigError(
                "model.kind = 'transformer' needs a token corpus (prepare a text corpus)"
            )
        if section.d_model % section.n_head:
            raise ConfigError("model.d_model must be divisible by model.n_head")
        if data.pad_id != PAD_ID or data.max_token_id >= VOCAB_SIZE:
            raise InputError(
                f"model.kind = 'transformer' is the byte-level model (ids 0..255, pad {PAD_ID}) but "
                f"the corpus has pad id {data.pad_id} and ids up to {data.max_token_id}: use "
                "model.kind = 'hf' with the model this corpus was tokenized for"
            )
        shape = TransformerShape(section.n_layer, section.n_head, section.d_model, data.seq_len)
        return ModelBundle(
            ByteTransformer(shape),
            lm_inputs,
            lm_per_example_loss,
            None,
            "lm",
            model_output=lm_margin_output,
            vocab_size=VOCAB_SIZE,
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
