"""Benchmark the sketcher on the demo-sized byte LM (2 layers, width 64, 64-token sequences).

Figures, measured in one run on random byte sequences:

(a) throughput (examples/s) of ``Sketcher`` with the Kronecker and the dense Gaussian
    projection, against a naive loop (one backward per example, then a dense Gaussian
    projection of the flattened gradient with a pre-generated matrix); target >= 5x;
(b) Kronecker sketch time over one plain batched forward+backward pass (with weight
    gradients) over the same examples; target <= 2.0;
(c) peak resident memory (``VmHWM`` of a fresh subprocess per run: overall, and during the
    streaming phase after a warm-up batch) when sketching N and 4N examples streamed in
    batches (sketch rows reduced to a checksum, as a stage writes them out chunk by
    chunk); target: no growth with N.

With ``--gpt2-small`` (what ``make bench`` runs) also a real width: a GPT-2-small-shaped
Hugging Face model (``GPT2Config()`` defaults: 12 layers, width 768, vocab 50257, 124M
parameters, random init; ``Conv1D`` layers and a tied ``lm_head``) on random token rows of
512 tokens: Kronecker sketch examples/s and tokens/s over every linear map, its time over
one plain batched forward+backward, and peak RSS streaming N and 4N examples (fresh
processes). On CPU this takes minutes, so N is small (``--gpt2-n``, default 16 and 64).

    python scripts/bench_sketch.py --json bench-sketch.json
    python scripts/bench_sketch.py --gpt2-small --only-gpt2-small --json bench-gpt2.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from grasp_cli.config import ModelSection, SketchSection
from grasp_cli.models import DataShape, ModelBundle, build_model
from grasp_cli.sketch import Sketcher
from grasp_cli.sketch.projections import DenseProjector

SEQ_LEN = 64
GPT2_SEQ_LEN = 512
GPT2_VOCAB = 50257


def demo_model() -> ModelBundle:
    bundle = build_model(ModelSection(), DataShape(seq_len=SEQ_LEN), seed=0)
    bundle.module.eval()
    return bundle


def gpt2_small() -> ModelBundle:
    """GPT-2 small's shape (``GPT2Config()`` defaults), random init, as grasp's 'hf' bundle.

    Pad id = the vocabulary size: random rows hold no padding, every target counts.
    """
    from transformers import AutoModelForCausalLM, GPT2Config

    from grasp_cli.models.hf import hf_bundle, transformers_module

    transformers_module()  # quiet logging, as grasp loads it
    torch.manual_seed(0)
    module = AutoModelForCausalLM.from_config(GPT2Config())
    return hf_bundle(module, pad_id=GPT2_VOCAB)


def gpt2_batches(n: int, batch_size: int, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """``n`` random rows ``int64 [B, 513]`` of GPT-2 token ids, batch by batch."""
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        yield {"tokens": torch.randint(0, GPT2_VOCAB, (size, GPT2_SEQ_LEN + 1), generator=gen)}


def random_batches(n: int, batch_size: int, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """``n`` random byte sequences ``int64 [B, 65]``, generated batch by batch (never all at once)."""
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        yield {"tokens": torch.randint(0, 256, (size, SEQ_LEN + 1), generator=gen)}


def time_sketch(sketcher: Sketcher, batches: list[dict[str, torch.Tensor]]) -> float:
    started = time.perf_counter()
    for batch in batches:
        sketcher.sketch_batch(batch)
    return time.perf_counter() - started


def time_forward_backward(bundle: ModelBundle, batches: list[dict[str, torch.Tensor]]) -> float:
    """One plain batched forward+backward per batch (weight gradients included), as training does."""
    started = time.perf_counter()
    for batch in batches:
        bundle.module.zero_grad(set_to_none=True)
        bundle.loss(batch).sum().backward()
    bundle.module.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def naive_projection(bundle: ModelBundle, k: int) -> torch.Tensor:
    """The whole dense Gaussian ``[k, D]`` for the naive loop (made once, not timed)."""
    projector = DenseProjector("gaussian", k, seed=1)
    params = bundle.module.named_parameters()
    return torch.cat([projector.matrix(name, p.numel()) for name, p in params], dim=1)


def time_naive(
    bundle: ModelBundle, batches: list[dict[str, torch.Tensor]], matrix: torch.Tensor
) -> float:
    """One backward per example, flatten the gradient, multiply by the dense ``matrix [k, D]``."""
    params = list(bundle.module.named_parameters())
    started = time.perf_counter()
    for batch in batches:
        for i in range(batch["tokens"].shape[0]):
            single = {"tokens": batch["tokens"][i : i + 1]}
            grads = torch.autograd.grad(bundle.loss(single).sum(), [p for _, p in params])
            flat = torch.cat([g.reshape(-1) for g in grads])
            (matrix @ flat).numpy()
    return time.perf_counter() - started


def peak_rss_mib() -> float:
    """Peak resident memory of this process image, MiB.

    ``VmHWM`` belongs to the current address space, so a fresh ``exec`` starts from zero;
    ``ru_maxrss`` would carry over the parent's size at ``fork`` and is only a fallback.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_child(kind: str, n: int, batch_size: int, k: int, model: str = "demo") -> None:
    """Runs in a fresh process: stream ``n`` examples through a sketcher, print peak RSS (MiB) as JSON."""
    bundle = gpt2_small() if model == "gpt2-small" else demo_model()
    batches = gpt2_batches if model == "gpt2-small" else random_batches
    sketcher = Sketcher(bundle, SketchSection(projection=kind, k=k), seed=1)
    sketcher.sketch_batch(next(batches(batch_size, batch_size, seed=99)))  # warm-up
    after_warmup = peak_rss_mib()
    was_reset = reset_peak_rss()
    checksum = 0.0
    for batch in batches(n, batch_size):
        checksum += float(sketcher.sketch_batch(batch).sum())
    streaming = peak_rss_mib()
    report = {
        "peak_through_warmup_mib": after_warmup,
        "peak_while_streaming_mib": streaming if was_reset else None,
        "peak_mib": max(after_warmup, streaming),
        "checksum": checksum,
    }
    print(json.dumps(report))


def measure_memory(
    kind: str, n: int, batch_size: int, k: int, threads: int, model: str = "demo"
) -> dict[str, float]:
    command = [
        sys.executable, __file__, "--memory-child", kind, "--mem-n", str(n),
        "--batch-size", str(batch_size), "--k", str(k), "--threads", str(threads),
        "--child-model", model,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    parser.add_argument("--n", type=int, default=512, help="examples for throughput and the ratio")
    parser.add_argument("--naive-n", type=int, default=64, help="examples for the naive loop")
    parser.add_argument("--mem-n", type=int, default=256, help="N for the memory check (and 4N)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument(
        "--gpt2-small",
        action="store_true",
        help="also bench a GPT-2-small-shaped HF model (124M params, seq_len 512; minutes on CPU)",
    )
    parser.add_argument("--only-gpt2-small", action="store_true", help="skip the demo-LM figures")
    parser.add_argument(
        "--gpt2-n", type=int, default=16, help="GPT-2: N for speed and memory (+4N)"
    )
    parser.add_argument("--gpt2-batch-size", type=int, default=8)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--child-model", default="demo", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args.mem_n, args.batch_size, args.k, args.child_model)
        return 0
    figures: dict = {}
    if not args.only_gpt2_small:
        figures.update(demo_figures(args))
    if args.gpt2_small or args.only_gpt2_small:
        figures["gpt2_small"] = gpt2_small_figures(args)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def gpt2_small_figures(args: argparse.Namespace) -> dict:
    """Kronecker sketching of a GPT-2-small-shaped model at 512 tokens: speed, ratio, memory."""
    bundle = gpt2_small()
    n, batch_size = args.gpt2_n, args.gpt2_batch_size
    batches = list(gpt2_batches(n, batch_size))
    kron = Sketcher(bundle, SketchSection(projection="kronecker", k=args.k), seed=1)
    warm = next(gpt2_batches(2, 2, seed=99))  # projection factors and allocator warm-up
    kron.sketch_batch(warm)
    time_forward_backward(bundle, [warm])
    sketch_s = time_sketch(kron, batches)
    fwd_bwd_s = time_forward_backward(bundle, batches)
    memory = {
        str(size): measure_memory(
            "kronecker", size, batch_size, args.k, args.threads, model="gpt2-small"
        )
        for size in (n, 4 * n)
    }

    def streaming(run: dict) -> float:
        value = run["peak_while_streaming_mib"]
        return run["peak_mib"] if value is None else value

    growth = streaming(memory[str(4 * n)]) - streaming(memory[str(n)])
    figures = {
        "model": "GPT2Config() defaults: 12 layers, 12 heads, d=768, vocab 50257; seq_len 512",
        "num_params": sum(p.numel() for p in bundle.module.parameters()),
        "kron_layers": len(kron.sites),
        "k": args.k,
        "kron_dim": SketchSection().kron_dim,
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "n": n,
        "seconds": {"kronecker": sketch_s, "fwd_bwd": fwd_bwd_s},
        "examples_per_s": {"kronecker": n / sketch_s, "fwd_bwd": n / fwd_bwd_s},
        "tokens_per_s": {
            "kronecker": n * GPT2_SEQ_LEN / sketch_s,
            "fwd_bwd": n * GPT2_SEQ_LEN / fwd_bwd_s,
        },
        "kronecker_over_fwd_bwd": sketch_s / fwd_bwd_s,
        "memory_mib": memory,
        "peak_growth_mib_n_to_4n": growth,
        "mem_n": [n, 4 * n],
    }
    print(
        f"GPT-2 small shape ({figures['num_params'] / 1e6:.1f}M params, {len(kron.sites)} linear "
        f"maps), seq_len {GPT2_SEQ_LEN}, k={args.k}, batch {batch_size}, {figures['threads']} threads"
    )
    print(
        f"kronecker sketch: {n / sketch_s:.2f} examples/s, {n * GPT2_SEQ_LEN / sketch_s:.0f} "
        f"tokens/s; plain forward+backward {n / fwd_bwd_s:.2f} examples/s; ratio "
        f"{sketch_s / fwd_bwd_s:.2f}"
    )
    print(
        f"peak RSS MiB, N={n}: {memory[str(n)]['peak_mib']:.0f} (streaming "
        f"{streaming(memory[str(n)]):.0f}); 4N={4 * n}: {memory[str(4 * n)]['peak_mib']:.0f} "
        f"(streaming {streaming(memory[str(4 * n)]):.0f}); growth {growth:.0f}"
    )
    return figures


def demo_figures(args: argparse.Namespace) -> dict:
    """The demo-LM figures (a)-(c) of the module docstring."""

    bundle = demo_model()
    batches = list(random_batches(args.n, args.batch_size))
    naive_batches = list(random_batches(args.naive_n, args.batch_size, seed=1))
    kron = Sketcher(bundle, SketchSection(projection="kronecker", k=args.k), seed=1)
    dense = Sketcher(bundle, SketchSection(projection="gaussian", k=args.k), seed=1)
    for warm in (kron, dense):  # first calls pay for vmap set-up and projection generation
        warm.sketch_batch(batches[0])
    time_forward_backward(bundle, batches[:1])

    times: dict[str, list[float]] = {"kronecker": [], "gaussian": [], "fwd_bwd": [], "naive": []}
    naive_matrix = naive_projection(bundle, args.k)
    for _ in range(args.repeats):  # interleaved, so load from other processes hits all alike
        times["fwd_bwd"].append(time_forward_backward(bundle, batches))
        times["kronecker"].append(time_sketch(kron, batches))
        times["gaussian"].append(time_sketch(dense, batches))
        times["naive"].append(time_naive(bundle, naive_batches, naive_matrix))
    median = {name: statistics.median(values) for name, values in times.items()}

    rate = {name: args.n / median[name] for name in ("kronecker", "gaussian", "fwd_bwd")}
    rate["naive"] = args.naive_n / median["naive"]
    ratios = [kr / fb for kr, fb in zip(times["kronecker"], times["fwd_bwd"], strict=True)]

    memory = {
        kind: {str(n): measure_memory(kind, n, args.batch_size, args.k, args.threads)
               for n in (args.mem_n, 4 * args.mem_n)}
        for kind in ("kronecker", "gaussian")
    }  # fmt: skip

    def streaming_peak(run: dict) -> float:
        value = run["peak_while_streaming_mib"]
        return run["peak_mib"] if value is None else value

    growth = {
        kind: streaming_peak(runs[str(4 * args.mem_n)]) - streaming_peak(runs[str(args.mem_n)])
        for kind, runs in memory.items()
    }

    figures = {
        "model": "transformer n_layer=2 n_head=2 d_model=64 seq_len=64",
        "num_params": sum(p.numel() for p in bundle.module.parameters()),
        "k": args.k,
        "kron_dim": SketchSection().kron_dim,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "n": args.n,
        "naive_n": args.naive_n,
        "repeats": args.repeats,
        "examples_per_s": rate,
        "speedup_vs_naive": {
            "kronecker": rate["kronecker"] / rate["naive"],
            "gaussian": rate["gaussian"] / rate["naive"],
        },
        "seconds_median": median,
        "kronecker_over_fwd_bwd": median["kronecker"] / median["fwd_bwd"],
        "kronecker_over_fwd_bwd_per_repeat": ratios,
        "memory_mib": memory,
        "peak_growth_mib_n_to_4n": growth,
        "mem_n": [args.mem_n, 4 * args.mem_n],
        "targets": {"speedup_vs_naive": ">= 5", "kronecker_over_fwd_bwd": "<= 2.0", "growth": "~0"},
    }
    figures["meets_targets"] = {
        "speedup_kronecker": figures["speedup_vs_naive"]["kronecker"] >= 5,
        "speedup_gaussian": figures["speedup_vs_naive"]["gaussian"] >= 5,
        "kronecker_over_fwd_bwd": figures["kronecker_over_fwd_bwd"] <= 2.0,
        "memory_flat": all(abs(g) < 32 for g in growth.values()),
    }

    print(f"demo LM ({figures['num_params']} params), k={args.k}, batch {args.batch_size}, "
          f"{figures['threads']} threads")  # fmt: skip
    print(f"{'method':<28}{'examples/s':>12}{'vs naive':>10}")
    for name in ("kronecker", "gaussian", "naive"):
        speedup = rate[name] / rate["naive"]
        print(f"{'sketcher ' + name if name != 'naive' else 'naive loop':<28}"
              f"{rate[name]:>12.0f}{speedup:>9.1f}x")  # fmt: skip
    print(f"plain forward+backward: {rate['fwd_bwd']:.0f} examples/s; "
          f"kronecker / fwd+bwd = {figures['kronecker_over_fwd_bwd']:.2f} "
          f"(per repeat {', '.join(f'{r:.2f}' for r in ratios)})")  # fmt: skip
    print(
        f"{'peak RSS MiB':<28}{'N=' + str(args.mem_n):>12}{'4N=' + str(4 * args.mem_n):>12}{'growth':>10}"
    )
    for kind, runs in memory.items():
        small, large = runs[str(args.mem_n)], runs[str(4 * args.mem_n)]
        print(
            f"{'sketcher ' + kind + ' (overall)':<28}"
            f"{small['peak_mib']:>12.1f}{large['peak_mib']:>12.1f}"
        )
        print(
            f"{'sketcher ' + kind + ' (streaming)':<28}{streaming_peak(small):>12.1f}"
            f"{streaming_peak(large):>12.1f}{growth[kind]:>10.1f}"
        )
    print("targets met:", json.dumps(figures["meets_targets"]))
    return figures


if __name__ == "__main__":
    sys.exit(main())
