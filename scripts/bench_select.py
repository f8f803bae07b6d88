"""Benchmark streaming selection on synthetic sketches stored in a Zarr array.

    python scripts/bench_select.py [--n 1000000] [--k 128] [--budget-frac 0.1] [--json FILE]

Writes clustered synthetic sketches ``[N, k]`` float32 to a temporary Zarr array (chunks of
``--chunk-rows`` rows), then measures:

- the floor: one plain pass that reads every block and does one matvec;
- ``stream_select`` at N (wall time, passes, objective vs the additive top-B baseline),
  and its ratio to the floor;
- the same at N/4 (budget B/4), and the ratio t(N)/t(N/4) — about 4 when cost is linear.

Prints the figures and, with ``--json``, writes them to FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grasp_cli.select import (  # noqa: E402
    additive_top_b,
    iter_blocks,
    objective_from_tasks,
    stream_select,
)


def write_sketches(
    path: Path, n: int, k: int, chunk_rows: int, seed: int, compressed: bool = True
) -> zarr.Array:
    """Clustered sketches: 64 domains with different gradient norms, noise, and
    near-duplicate bursts (the redundancy an additive score cannot see). ``compressed=False``
    stores them as ``grasp sketch`` does (no compressor)."""
    rng = np.random.default_rng(seed)
    n_clusters = 64
    centers = rng.normal(size=(n_clusters, k)).astype(np.float32)
    centers *= rng.lognormal(0.0, 0.6, size=(n_clusters, 1)).astype(np.float32)
    codecs = {} if compressed else {"compressors": None}
    arr = zarr.create_array(
        str(path), shape=(n, k), chunks=(chunk_rows, k), dtype="float32", overwrite=True, **codecs
    )
    for start in range(0, n, chunk_rows):
        rows = min(chunk_rows, n - start)
        block_rng = np.random.default_rng([seed, start])
        labels = block_rng.integers(0, n_clusters, rows)
        block = centers[labels] + block_rng.normal(size=(rows, k)).astype(np.float32)
        # a burst of near-copies of one row in every chunk
        burst = block_rng.integers(0, rows, 2)
        lo, hi = min(burst), min(min(burst) + rows // 50, rows)
        block[lo:hi] = block[lo] + 0.01 * block_rng.normal(size=(hi - lo, k)).astype(np.float32)
        arr[start : start + rows] = block
    return arr


def make_objective(k: int, budget: int, seed: int, curvature: float = 10.0, n_tasks: int = 4):
    """Per-task (v_t, Q_t = b_t G_t) with a diagonal-plus-low-rank G; mean aggregation.

    ``curvature`` scales Q: large enough that the best mean sketch lies inside the data
    (redundancy matters and the additive top-B is far from optimal)."""
    rng = np.random.default_rng(seed + 1)
    v = rng.normal(size=(n_tasks, k)) * 2.0
    quad = []
    for _ in range(n_tasks):
        low = rng.normal(size=(k, 8)) / np.sqrt(k)
        quad.append(curvature * (0.05 * np.diag(rng.uniform(0.5, 2.0, k)) + low @ low.T))
    return objective_from_tasks(v, np.stack(quad), np.zeros(n_tasks), scale=1.0 / budget)


def floor_pass(arr, k: int, block_rows: int) -> float:
    """Seconds for one plain pass: read every block and do one matvec."""
    direction = np.ones(k, dtype=np.float32)
    t0 = time.perf_counter()
    total = 0.0
    for _, block in iter_blocks(arr, block_rows, k, prefetch=True):
        total += float((block @ direction).sum())
    return time.perf_counter() - t0


def run_size(
    arr,
    n: int,
    k: int,
    budget: int,
    block_rows: int,
    max_iters: int,
    seed: int,
    curvature: float,
    progress: bool,
    repeats: int,
) -> dict:
    objective = make_objective(k, budget, seed, curvature)
    floors, walls = [], []
    for _ in range(repeats):  # interleaved, best of `repeats`: the machine may be shared
        floors.append(floor_pass(arr, k, block_rows))
        t0 = time.perf_counter()
        result = stream_select(
            arr, objective, budget, block_rows=block_rows, max_iters=max_iters, progress=progress
        )
        walls.append(time.perf_counter() - t0)
    floor, wall = min(floors), min(walls)
    additive = additive_top_b(arr, objective, budget, block_rows=block_rows)
    return {
        "n": n,
        "k": k,
        "budget": budget,
        "stream_wall_s": wall,
        "passes": result.passes,
        "converged": result.converged,
        "floor_pass_s": floor,
        "ratio_to_floor": wall / floor,
        "ratio_to_floor_per_pass": wall / floor / result.passes,
        "objective_stream": result.value,
        "objective_additive": additive.value,
        "stream_walls_s": walls,
        "floor_passes_s": floors,
        "load_average": os.getloadavg(),
        "history": result.history,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--n", type=int, default=1_000_000, help="examples (rows of the sketch array)"
    )
    parser.add_argument("--k", type=int, default=128, help="sketch dimension")
    parser.add_argument("--budget-frac", type=float, default=0.1, help="B as a fraction of N")
    parser.add_argument("--chunk-rows", type=int, default=65_536, help="Zarr chunk rows")
    parser.add_argument("--block-rows", type=int, default=262_144, help="rows read per block")
    parser.add_argument("--max-iters", type=int, default=20, help="most passes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="timings are the best of this many")
    parser.add_argument("--no-small", action="store_true", help="skip the N/4 run")
    parser.add_argument("--curvature", type=float, default=10.0, help="scale of the quadratic term")
    parser.add_argument(
        "--blas-threads",
        type=int,
        default=1,
        help="BLAS threads (0 = library default); 1 avoids oversubscription on small shared machines",
    )
    parser.add_argument("--progress", action="store_true", help="show tqdm bars")
    parser.add_argument("--tmp", default=None, help="folder for the temporary Zarr arrays")
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)

    if args.blas_threads > 0:
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(args.blas_threads, user_api="blas")
        except ImportError:
            print("threadpoolctl not installed: BLAS threads left at the library default")
    tmp = Path(tempfile.mkdtemp(prefix="bench_select_", dir=args.tmp))
    figures: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "zarr": zarr.__version__,
        },
        "chunk_rows": args.chunk_rows,
        "block_rows": args.block_rows,
        "curvature": args.curvature,
        "blas_threads": args.blas_threads,
    }
    try:
        sizes = [args.n] if args.no_small else [args.n, args.n // 4]
        runs = []
        for n in sizes:
            budget = max(1, int(round(args.budget_frac * n)))
            t0 = time.perf_counter()
            arr = write_sketches(tmp / f"phi_{n}.zarr", n, args.k, args.chunk_rows, args.seed)
            write_s = time.perf_counter() - t0
            run = run_size(
                arr,
                n,
                args.k,
                budget,
                args.block_rows,
                args.max_iters,
                args.seed,
                args.curvature,
                args.progress,
                args.repeats,
            )
            run["write_s"] = write_s
            runs.append(run)
            print(
                f"N={n:>9,d} k={args.k} B={budget:>8,d}: stream {run['stream_wall_s']:.2f}s "
                f"in {run['passes']} passes (converged={run['converged']}); one plain pass "
                f"{run['floor_pass_s']:.2f}s; ratio {run['ratio_to_floor']:.1f}x "
                f"({run['ratio_to_floor_per_pass']:.2f}x per pass); "
                f"F stream {run['objective_stream']:.4f} vs additive {run['objective_additive']:.4f}"
            )
            shutil.rmtree(tmp / f"phi_{n}.zarr", ignore_errors=True)
        figures["runs"] = runs
        if len(runs) == 2:
            ratio = runs[0]["stream_wall_s"] / runs[1]["stream_wall_s"]
            figures["time_ratio_n_over_quarter"] = ratio
            figures["floor_ratio_n_over_quarter"] = (
                runs[0]["floor_pass_s"] / runs[1]["floor_pass_s"]
            )
            print(
                f"t({runs[0]['n']:,d}) / t({runs[1]['n']:,d}) = {ratio:.2f} "
                f"(plain pass: {figures['floor_ratio_n_over_quarter']:.2f}; linear cost ≈ 4)"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=float))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
