"""Benchmark the retraining engine on the demo-sized byte LM with random bytes.

Figures: (a) overhead of ``train`` over a bare torch loop (same model, AdamW, steps,
batch and data indexing), (b) speedup of ``train_many`` (vmap) over sequential ``train``,
(c) subsets per hour (training + task evaluation) in both modes.

    python scripts/bench_retrain.py [--steps 60] [--models 4] [--threads 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from grasp_cli.config import ModelSection
from grasp_cli.models import DataShape, build_model, call_module
from grasp_cli.train import (
    TrainRecipe,
    batch_rows,
    evaluate_many,
    evaluate_tasks,
    train,
    train_many,
)


def bare_loop(bundle, data, indices, recipe, seed) -> float:
    """The least a training loop can do: AdamW, no schedule, no clipping, no bookkeeping."""
    start = time.perf_counter()
    model = copy.deepcopy(bundle.module)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=recipe.betas)
    rows = batch_rows(np.sort(indices), recipe.steps, recipe.batch_size, seed)
    for step in range(recipe.steps):
        index = torch.from_numpy(rows[step])
        batch = {key: value[index] for key, value in data.items()}
        loss = bundle.per_example_loss(call_module(model, bundle.inputs(batch)), batch).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=2000, help="corpus sequences")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (+1 stored)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per subset")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--models", type=int, default=4, help="models trained at once by train_many"
    )
    parser.add_argument(
        "--task-seqs", type=int, default=512, help="task sequences evaluated per model"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timing repeats (the minimum is kept)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch default)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here as JSON")
    args = parser.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    shape = DataShape(seq_len=args.seq_len)
    bundle = build_model(ModelSection(n_layer=2, n_head=2, d_model=64), shape, seed=0)
    generator = torch.Generator().manual_seed(0)
    data = {"tokens": torch.randint(0, 256, (args.n, args.seq_len + 1), generator=generator)}
    half = args.task_seqs // 2
    task_tokens = torch.randint(0, 256, (2 * half, args.seq_len + 1), generator=generator)
    tasks = {"a": {"tokens": task_tokens[:half]}, "b": {"tokens": task_tokens[half:]}}
    recipe = TrainRecipe(steps=args.steps, batch_size=args.batch_size, lr=1e-3, warmup_steps=5)
    rng = np.random.default_rng(0)
    subsets = [rng.choice(args.n, size=args.n // 2, replace=False) for _ in range(args.models)]
    init = train(
        bundle, data, subsets[0], TrainRecipe(steps=2, batch_size=4, lr=1e-3), seed=0
    ).state_dict

    # (a) train vs the bare loop, interleaved so that machine load hits both alike.
    bare_s, train_s = [], []
    for r in range(args.repeats):
        bare_s.append(bare_loop(bundle, data, subsets[0], recipe, seed=r))
        train_s.append(
            timed(lambda r=r: train(bundle, data, subsets[0], recipe, seed=r, init_state=init))
        )
    overhead = min(train_s) / min(bare_s) - 1.0

    # (b) train_many vs sequential train, and evaluation of the same models.
    seq_s, many_s, eval_seq_s, eval_many_s = [], [], [], []
    states: list = []
    for r in range(max(1, args.repeats - 1)):
        seq_s.append(
            timed(lambda: [train(bundle, data, s, recipe, 0, init_state=init) for s in subsets])
        )
        many_s.append(
            timed(
                lambda: states.extend(
                    r.state_dict for r in train_many(bundle, data, subsets, recipe, 0, init)
                )
            )
        )
        models = states[: args.models]
        eval_seq_s.append(
            timed(lambda m=models: [evaluate_tasks(bundle, s, tasks, 256) for s in m])
        )
        eval_many_s.append(timed(lambda m=models: evaluate_many(bundle, m, tasks, 256)))
    sequential_per_subset = (min(seq_s) + min(eval_seq_s)) / args.models
    parallel_per_subset = (min(many_s) + min(eval_many_s)) / args.models

    figures = {
        "config": {
            "n": args.n,
            "seq_len": args.seq_len,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "models": args.models,
            "task_seqs": 2 * half,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "parameters": sum(p.numel() for p in bundle.module.parameters()),
        },
        "bare_loop_s": min(bare_s),
        "train_s": min(train_s),
        "train_overhead": overhead,
        "train_ms_per_step": 1e3 * min(train_s) / args.steps,
        "sequential_train_s": min(seq_s),
        "train_many_s": min(many_s),
        "train_many_speedup": min(seq_s) / min(many_s),
        "sequential_eval_s": min(eval_seq_s),
        "evaluate_many_s": min(eval_many_s),
        "evaluate_many_speedup": min(eval_seq_s) / min(eval_many_s),
        "subsets_per_hour_sequential": 3600.0 / sequential_per_subset,
        "subsets_per_hour_parallel": 3600.0 / parallel_per_subset,
    }
    print(
        f"model: ByteTransformer 2x2x64, {figures['config']['parameters']} parameters, "
        f"{torch.get_num_threads()} thread(s); {args.steps} steps x batch {args.batch_size}"
    )
    print(
        f"(a) bare loop {min(bare_s):.2f} s, train {min(train_s):.2f} s: overhead {100 * overhead:+.1f}%"
    )
    print(
        f"(b) {args.models} models: sequential {min(seq_s):.2f} s, train_many {min(many_s):.2f} s "
        f"-> x{figures['train_many_speedup']:.2f}; evaluation x{figures['evaluate_many_speedup']:.2f}"
    )
    print(
        f"(c) subsets/hour (train + {2 * half} task seqs): sequential "
        f"{figures['subsets_per_hour_sequential']:.0f}, parallel {figures['subsets_per_hour_parallel']:.0f}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
