"""Build the `make hf-demo` model offline: a byte-level BPE tokenizer trained on the demo corpus
(Python's own docs and stdlib, see grasp_cli.prepare.documents.demo_texts) and a randomly
initialized tiny GPT-2 or Llama sized for it, saved with save_pretrained.

    python scripts/make_hf_demo_model.py --out runs/hf-demo/hf-model [--arch gpt2|llama]

writes OUT/config.json, OUT/model.safetensors and OUT/tokenizer.json (so the folder is both
`model.path` and `prepare.tokenizer`). Deterministic: the same arguments give the same files
(the tokenizer is trained on the first --train-mb MB of the demo texts in their fixed order;
the weights are seeded). Nothing is downloaded. A folder already built with the same
arguments is left as it is (OUT/build.json records them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EOS = "<|endoftext|>"


def train_tokenizer(texts, vocab_size: int):
    """Byte-level BPE (GPT-2's scheme: lossless on any text) with EOS as id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def demo_sample(megabytes: float) -> list[str]:
    """The demo corpus's document texts, in order, up to ``megabytes`` of UTF-8."""
    from grasp_cli.prepare.documents import demo_texts

    budget, texts = int(megabytes * 2**20), []
    for text in demo_texts():
        budget -= len(text.encode("utf-8"))
        if budget < 0:
            break
        texts.append(text)
    return texts


def build_model(
    arch: str, vocab: int, positions: int, width: int, layers: int, eos: int, seed: int
):
    """A seeded random init of a tiny causal LM (dropout 0: retrained subsets differ by data)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_positions=positions, n_embd=width, n_layer=layers, n_head=2,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos, eos_token_id=eos,
        )  # fmt: skip
    else:
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
            num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=positions, bos_token_id=eos, eos_token_id=eos,
        )  # fmt: skip
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write (in the run)")
    parser.add_argument("--arch", choices=("gpt2", "llama"), default="gpt2")
    parser.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary size")
    parser.add_argument("--positions", type=int, default=128, help="model positions (>= seq_len)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--train-mb", type=float, default=4.0, help="demo text to train BPE on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    settings = {k: str(v) for k, v in sorted(vars(args).items()) if k != "out"}
    stamp = args.out / "build.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == settings:
        print(f"{args.out}: up to date")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(demo_sample(args.train_mb), args.vocab)
    vocab, eos = tokenizer.get_vocab_size(with_added_tokens=True), tokenizer.token_to_id(EOS)
    model = build_model(args.arch, vocab, args.positions, args.width, args.layers, eos, args.seed)
    model.save_pretrained(str(args.out))
    tokenizer.save(str(args.out / "tokenizer.json"))
    stamp.write_text(json.dumps(settings))
    count = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {args.arch}, {count} parameters, BPE vocabulary {vocab} (EOS id {eos})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
