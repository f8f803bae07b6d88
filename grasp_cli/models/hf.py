"""Hugging Face causal LMs: a user's ``save_pretrained`` folder as a grasp model (``model.kind = 'hf'``).

The folder must hold ``config.json`` and safetensors weights (``model.safetensors`` or the
shards of ``model.safetensors.index.json``); it is loaded offline
(``local_files_only``, ``use_safetensors``: no download, no pickle) with
``AutoModelForCausalLM``, so any architecture transformers supports works. The loaded
weights are the model's initial weights, and θ0 unless ``reference.steps > 0`` asks for
more training (see ``grasp_cli.reference``).

The module is the transformers model itself, not a wrapper, so parameter and module names
(``transformer.h.0.attn.c_attn``, ``model.layers.0.self_attn.q_proj``) are the ones users
know from the checkpoint, in ``sketch.params`` / ``sketch.modules`` patterns and state dicts.

Batches are corpus rows ``tokens [B, L+1]``. The model sees ``input_ids = tokens[:, :-1]``
with ``attention_mask = input_ids != pad`` (pad positions are fed as id 0, so a pad id
outside the vocabulary is fine); the loss of a row is the mean next-token cross-entropy
over its non-pad targets.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from grasp_cli.config import ModelSection
from grasp_cli.errors import ConfigError, InputError
from grasp_cli.models import Batch, DataShape, ModelBundle
from grasp_cli.models.transformer import lm_margin_output, next_token_loss

CONFIG_FILE = "config.json"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def checkpoint_files(folder: Path) -> tuple[Path, list[Path]]:
    """``(config.json, [weight files])`` of a save_pretrained folder, or an InputError naming it.

    Weight files are every ``*.safetensors`` plus the shard index when there is one, sorted
    by name: what θ0's digest is computed over.
    """
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "not found"
        raise InputError(f"{folder}: model folder {what} (model.path)")
    config = folder / CONFIG_FILE
    if not config.is_file():
        raise InputError(
            f"{folder}: no {CONFIG_FILE}; model.path must be a folder written by save_pretrained"
        )
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern))
        if pickled:
            raise InputError(
                f"{folder}: only pickle weights ({', '.join(pickled[:3])}); grasp loads "
                "safetensors only: re-save with save_pretrained(DIR, safe_serialization=True)"
            )
        raise InputError(f"{folder}: no weights (*.safetensors) next to {CONFIG_FILE}")
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        weights.append(index)
    return config, weights


def transformers_module() -> Any:
    """``transformers``, imported lazily and told to keep quiet (errors still surface as ours)."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "model.kind = 'hf' needs the transformers package: pip install 'grasp-cli[hf]'"
        ) from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load_hf_bundle(section: ModelSection, data: DataShape) -> ModelBundle:
    """The checkpoint in ``section.path`` as a ``ModelBundle`` (eval mode, ``section.dtype``).

    Checks, each an InputError naming the folder: config.json and safetensors weights exist;
    the weights cover every parameter exactly (nothing left randomly initialized, nothing
    extra, no shape mismatch); every corpus token id (``data.max_token_id``) is inside the
    vocabulary; rows of ``data.seq_len`` input tokens fit the model's positions.
    """
    folder = Path(section.path)
    config_file, _ = checkpoint_files(folder)
    if data.seq_len <= 0:
        raise ConfigError("model.kind = 'hf' needs a token corpus (prepare a text corpus)")
    transformers = transformers_module()
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a bad config
        raise InputError(f"{config_file}: not a usable model config ({_first_line(exc)})") from None
    for key, value in section.options.items():
        if not hasattr(config, key):
            raise ConfigError(f"model.options.{key}: {config_file} has no attribute {key!r}")
        setattr(config, key, value)
    declared = getattr(config, "vocab_size", None)
    if isinstance(declared, int):  # fail before loading (possibly large) weights
        _check_vocab(folder, declared, data.max_token_id, "config.json vocab_size")
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and data.seq_len > limit:
        raise InputError(
            f"{folder}: corpus rows have {data.seq_len} input tokens but the model takes at most "
            f"{limit} positions ({config_file}); prepare with prepare.seq_len <= {limit}"
        )
    try:
        module, info = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder),
            config=config,
            local_files_only=True,
            use_safetensors=True,
            dtype=DTYPES[section.dtype],
            output_loading_info=True,
        )
    except Exception as exc:  # noqa: BLE001 - unreadable weights, unknown architecture, ...
        raise InputError(f"{folder}: cannot load the checkpoint ({_first_line(exc)})") from None
    problems = [
        f"{what} {list(info.get(key) or [])[:3]}"
        for key, what in (
            ("missing_keys", "missing"),
            ("mismatched_keys", "wrong shape"),
            ("unexpected_keys", "unexpected"),
        )
        if info.get(key)
    ]
    if problems:
        raise InputError(
            f"{folder}: the weights do not match {CONFIG_FILE} ({'; '.join(problems)}); θ0 must "
            "be the checkpoint itself, not partly re-initialized"
        )
    bundle = hf_bundle(module, data.pad_id)
    _check_vocab(folder, bundle.vocab_size, data.max_token_id, "rows of the output embedding")
    return bundle


def hf_bundle(module: torch.nn.Module, pad_id: int) -> ModelBundle:
    """A transformers causal LM (already loaded or built) as a ``ModelBundle``, in eval mode.

    ``pad_id``: the corpus's padding id (masked out of attention and loss).
    """
    module.eval()
    return ModelBundle(
        module,
        functools.partial(hf_inputs, pad_id=pad_id),
        functools.partial(hf_per_example_loss, pad_id=pad_id),
        None,
        "lm",
        model_output=functools.partial(hf_model_output, pad_id=pad_id),
        per_example="loop",
        vocab_size=_vocab_size(module),
    )


def hf_model_output(outputs: Any, batch: Batch, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TRAK's LM margin and out-to-loss weight (``lm_margin_output``) of a transformers output."""
    logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
    return lm_margin_output(logits, batch, pad_id)


def hf_inputs(batch: Batch, pad_id: int) -> dict[str, Any]:
    """Keyword inputs for rows ``tokens [B, L+1]``: ``input_ids [B, L]``, ``attention_mask [B, L]``.

    Pad positions get id 0 and mask 0 (they are never attended to and never a target);
    ``use_cache=False`` because nothing is generated.
    """
    tokens = batch["tokens"][..., :-1]
    real = tokens != pad_id
    return {
        "input_ids": tokens.masked_fill(~real, 0),
        "attention_mask": real.to(torch.long),
        "use_cache": False,
    }


def hf_per_example_loss(outputs: Any, batch: Batch, pad_id: int) -> torch.Tensor:
    """Mean next-token cross-entropy (nats/token) over each row's non-pad targets, ``[B]``."""
    logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
    return next_token_loss(logits, batch["tokens"], pad_id)


def _vocab_size(module: torch.nn.Module) -> int:
    """Token ids the model accepts and predicts: the smaller of its input and output embeddings."""
    sizes = []
    embeddings = module.get_input_embeddings()
    if embeddings is not None and hasattr(embeddings, "num_embeddings"):
        sizes.append(int(embeddings.num_embeddings))
    head = module.get_output_embeddings()
    if head is not None and hasattr(head, "out_features"):
        sizes.append(int(head.out_features))
    if not sizes:
        sizes.append(int(module.config.vocab_size))
    return min(sizes)


def _check_vocab(folder: Path, vocab: int | None, max_token_id: int, source: str) -> None:
    if vocab is not None and max_token_id >= vocab:
        raise InputError(
            f"{folder}: the corpus has token id {max_token_id} but the model's vocabulary has "
            f"{vocab} ids (0..{vocab - 1}, {source}); tokenize the corpus with this model's "
            "tokenizer"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]
