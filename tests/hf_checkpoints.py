"""Tiny Hugging Face checkpoints for tests: real architectures, random init, saved offline.

Sized for grasp's byte corpus (vocab 257, pad id 256) and tests/tiny.toml (32-token rows):
GPT-2 has ``Conv1D`` layers and a tied ``lm_head``; Llama has ``nn.Linear`` layers, RoPE,
RMSNorm, grouped-query attention and an untied ``lm_head``. Dropout is 0 so a retrained
subset differs from another only by its data (as grasp's own models).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

ARCHITECTURES = ("gpt2", "llama")


def gpt2_config(**overrides) -> GPT2Config:
    values = dict(
        vocab_size=257,
        n_positions=64,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=256,
        bos_token_id=0,
        eos_token_id=0,
    )
    values.update(overrides)
    return GPT2Config(**values)


def llama_config(**overrides) -> LlamaConfig:
    values = dict(
        vocab_size=257,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=256,
        bos_token_id=0,
        eos_token_id=0,
    )
    values.update(overrides)
    return LlamaConfig(**values)


CONFIGS = {"gpt2": gpt2_config, "llama": llama_config}


def build(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialized (seeded) model of ``arch`` with config ``overrides``, eval mode."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[arch](**overrides)).eval()


def save(arch: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """``build(...)`` written with ``save_pretrained`` (config.json + model.safetensors)."""
    build(arch, seed, **overrides).save_pretrained(str(folder))
    return Path(folder)


def train_tokenizer(texts, vocab_size: int = 320, specials=("<|endoftext|>",)):
    """A byte-level BPE ``tokenizers.Tokenizer`` (GPT-2's scheme: lossless on any text) trained
    offline on ``texts``; ``specials`` come first (ids 0..). Deterministic for the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer)
    return tokenizer
