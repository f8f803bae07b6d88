"""A byte-level decoder-only transformer LM, small enough to read in one sitting.

Tokens are bytes (0..255) plus one padding id (256) that never counts in the loss.
Every weight matrix is an ``nn.Linear`` so Kronecker-factored sketches can see
each one's inputs and output gradients. No dropout: grasp needs training runs
that differ only by their data, not by noise we could have avoided.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from grasp_cli.artifacts.examples import BYTE_PAD_ID, BYTE_VOCAB_SIZE

PAD_ID = BYTE_PAD_ID
VOCAB_SIZE = BYTE_VOCAB_SIZE
IGNORED = -100  # target id cross_entropy skips (pad targets are mapped to it)


@dataclass(frozen=True)
class TransformerShape:
    n_layer: int = 2
    n_head: int = 2
    d_model: int = 64
    context: int = 64  # longest input sequence (tokens)
    vocab_size: int = VOCAB_SIZE


class CausalSelfAttention(nn.Module):
    def __init__(self, shape: TransformerShape) -> None:
        super().__init__()
        self.n_head = shape.n_head
        self.qkv = nn.Linear(shape.d_model, 3 * shape.d_model)
        self.proj = nn.Linear(shape.d_model, shape.d_model)
        mask = torch.tril(torch.ones(shape.context, shape.context, dtype=torch.bool))
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        heads = lambda t: t.view(batch, length, self.n_head, -1).transpose(1, 2)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        att = att.masked_fill(~self.causal_mask[:length, :length], float("-inf"))
        y = att.softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    def __init__(self, shape: TransformerShape) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(shape.d_model)
        self.attn = CausalSelfAttention(shape)
        self.ln2 = nn.LayerNorm(shape.d_model)
        self.fc = nn.Linear(shape.d_model, 4 * shape.d_model)
        self.fc_proj = nn.Linear(4 * shape.d_model, shape.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc_proj(F.gelu(self.fc(self.ln2(x))))


class ByteTransformer(nn.Module):
    """Maps token ids ``[B, L]`` (L <= context) to next-token logits ``[B, L, vocab]``."""

    def __init__(self, shape: TransformerShape) -> None:
        super().__init__()
        self.shape = shape
        self.tok_emb = nn.Embedding(shape.vocab_size, shape.d_model)
        self.pos_emb = nn.Embedding(shape.context, shape.d_model)
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.n_layer))
        self.ln_f = nn.LayerNorm(shape.d_model)
        self.lm_head = nn.Linear(shape.d_model, shape.vocab_size, bias=False)
        self.apply(_init_weights)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[-1], device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


def lm_inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The model input for a batch of sequences ``tokens [B, L+1]``: all but the last token."""
    return (batch["tokens"][..., :-1],)


def lm_per_example_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy (nats/byte) of each sequence, ``[B]``; padding ignored."""
    return next_token_loss(logits, batch["tokens"], PAD_ID)


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Mean next-token cross-entropy (nats/token) of each sequence, ``[B]``.

    ``logits [B, L, V]`` predict ``tokens [B, L+1]`` shifted by one; targets equal to
    ``pad_id`` count neither in the sum nor in the mean (a row of padding only has loss 0).
    Computed in float32 whatever the logits' dtype.
    """
    targets = tokens[..., 1:]
    counted = targets != pad_id
    token_loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.masked_fill(~counted, IGNORED).reshape(-1),  # pad may lie outside the vocabulary
        ignore_index=IGNORED,
        reduction="none",
    ).view(targets.shape)
    counted = counted.to(token_loss.dtype)
    return (token_loss * counted).sum(-1) / counted.sum(-1).clamp_min(1.0)


def lm_margin_output(
    logits: torch.Tensor, batch: dict[str, torch.Tensor], pad_id: int = PAD_ID
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRAK's model output for an LM and its out-to-loss weight, per sequence: ``(f [B], Q [B])``.

    ``f(z) = Σ_τ log(p_τ / (1 − p_τ)) = Σ_τ [logit_y − logsumexp_{j≠y} logit_j]`` over the
    non-padding next-token positions τ (the per-token margin of TRAK, summed), and
    ``Q(z) = mean_τ (1 − p_τ)``. For one token ``∂ℓ/∂f = −(1 − p)``: the loss gradient is the
    margin gradient weighted by ``−Q``, which is how TRAK turns output gradients into the
    effect of training on ``z``.
    """
    targets = batch["tokens"][..., 1:]
    counted = targets != pad_id
    safe = torch.where(counted, targets, torch.zeros_like(targets))
    logits = logits.float()
    correct = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, safe.unsqueeze(-1), float("-inf"))
    margin = correct - torch.logsumexp(others, dim=-1)
    p = torch.softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    weight = counted.to(logits.dtype)
    output = (margin * weight).sum(-1)
    q = ((1.0 - p) * weight).sum(-1) / weight.sum(-1).clamp_min(1.0)
    return output, q
