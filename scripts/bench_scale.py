"""Benchmark memory and throughput at scale: peak RSS of every stage at N and 10N corpus rows.

    python scripts/bench_scale.py [--n 200000] [--factor 10] [--select-n 10000000]
                                  [--prepare-mb 100] [--json FILE]

Synthetic documents (jsonl, 8 domains, 1-7 rows each) make a corpus of about N rows and one
of ``factor``·N rows (16-byte rows and a tiny LM, so that sketching millions of rows stays
cheap; memory per row is what is measured). Every stage runs through the real CLI in its own
process, and its peak resident memory is read from the kernel for that process alone
(``os.wait4``): what a user's job would need. Reported:

- peak RSS of prepare, sketch, retrain-subsets, fit-surrogate, score, select, select without
  the ``dsir-ref`` curation selector (``select-own``: grasp's own code only, the authors' DSIR
  package computes its weights) and the streamed ``select --export`` at N and factor·N, and
  the growth ``peak(10N) / peak(N) - 1``.
  Stages hold fixed-size buffers (a row group, a sketch chunk, two 65,536-row blocks of the
  sketch array, B selected rows), so N must exceed them (the default does) for the growth to
  show what is held per corpus row; ``select.budget`` is a fixed count for the same reason;
- prepare's throughput on ``--prepare-mb`` MB of jsonl (64-byte rows) in documents/s and
  MB/s, against a plain read of the same files (bytes only) and a plain parse
  (``json.loads`` of every line);
- ``stream_select`` on a synthetic sketch array of ``--select-n`` rows, k = 128, B = N/10,
  stored as ``grasp sketch`` stores it (no compressor): wall time, passes, and the ratio to
  one plain read of the array (see ``bench_select.py``).

Prints a table and, with ``--json``, writes every figure to FILE. ``measure_stages`` is
also what ``tests/test_scale.py`` runs at a small N.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = [
    "prepare",
    "sketch",
    "retrain-subsets",
    "fit-surrogate",
    "score",
    "select",
    "export",
    "select-own",
]
# select-own: select with every curation selector but dsir-ref, whose weights the authors'
# data-selection package computes (its memory, not grasp's). Last: the run remembers its
# selectors, and select and export measure the default ones.


def own_selectors() -> list[str]:
    """The default curation selectors but ``dsir-ref``."""
    from grasp_cli.config import SelectSection

    return [name for name in SelectSection().curation_selectors if name != "dsir-ref"]


WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there been one all we their has would when if "
    "so no will more about can out up them some could what into than then other only time "
    "gradient subset corpus token sketch model train select data attribution"
).split()

RECIPE = """\
[run]
seed = 0
threads = 1

[prepare]
seq_len = {seq_len}
holdout_domains = ["d0"]
holdout_fraction = 0.02
max_task_seqs = 256
shard_rows = 100000
row_group_rows = {row_group_rows}

[model]
kind = "transformer"
n_layer = 1
n_head = 2
d_model = 16

[reference]
slice_fraction = 0.5
steps = 30
batch_size = 16

[sketch]
projection = "kronecker"
k = 64
kron_dim = 4
batch_size = 256
chunk_rows = {chunk_rows}
task_batch_size = 256

[subsets]
designs = {{ mixture = 12, within = 4 }}
eval_fraction = 0.35
size_min = 0.1
size_max = 0.5

[retrain]
init = "reference"
steps = 20
batch_size = 16
repeat_subsets = 2
repeat_seeds = 1
eval_batch_size = 256

[surrogate]
k_grid = [16, 64]
geometry_grid = ["identity", "diagonal"]
ridge_grid = [1.0, inf]
aggregation_grid = ["mean"]
folds = 3
repeats = 1
bootstrap = 100
cost_curve = [6]

[score]
chunk_rows = {chunk_rows}

[select]
budget = 2000      # a fixed count: the rows select holds grow with B, by design, not with N
block_rows = {chunk_rows}
greedy_max_n = 0   # always the streaming method (exact greedy reads phi whole, by design)
"""


def recipe(row_group_rows: int = 8192, chunk_rows: int = 8192, seq_len: int = 16) -> str:
    """The benchmark's config: a tiny byte LM on rows of ``seq_len`` bytes; buffers of
    ``row_group_rows`` rows in prepare and ``chunk_rows`` rows in sketch, score and select
    (memory is flat once N exceeds every buffer; fit-surrogate, score and select also read
    the sketch array in blocks of 65,536 rows)."""
    return RECIPE.format(row_group_rows=row_group_rows, chunk_rows=chunk_rows, seq_len=seq_len)


def write_documents(
    folder: Path, rows: int, seq_len: int = 64, files: int = 4, seed: int = 0
) -> dict:
    """jsonl documents giving about ``rows`` training rows of ``seq_len`` bytes, in ``files``
    files; returns counts (documents, bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vocab = np.array(WORDS)
    documents, made, total_bytes = 0, 0, 0
    handles = [open(folder / f"part-{f:03d}.jsonl", "w", encoding="utf-8") for f in range(files)]  # noqa: SIM115
    try:
        while made < rows:
            want = int(rng.integers(1, 8))  # rows of this document
            words = rng.choice(vocab, size=max(4, want * seq_len // 5))
            text = " ".join(words.tolist())[: want * seq_len + 1]
            line = json.dumps(
                {"id": f"doc-{documents}", "domain": f"d{documents % 8}", "text": text}
            )
            handles[documents % files].write(line + "\n")
            total_bytes += len(line) + 1
            made += max(1, -(-(len(text.encode()) - 1) // seq_len))
            documents += 1
    finally:
        for handle in handles:
            handle.close()
    return {"documents": documents, "bytes": total_bytes}


def run_measured(args: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run ``args`` as a child process; its exit code, wall time and peak RSS (MiB)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd, text=True
    )
    # read the pipes while it runs (a full pipe would stall it), then reap it with its rusage
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{out}\n{err}")
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024.0, "stdout": out.strip()}


def grasp_command(stage: str, config: Path, run: Path, inputs: Path) -> list[str]:
    base = [sys.executable, "-m", "grasp_cli.cli"]
    if stage == "prepare":
        return [*base, "prepare", str(inputs), "--config", str(config), "--run", str(run)]
    if stage == "select-own":
        own = config.with_name("recipe-own.toml")
        own.write_text(
            config.read_text().replace(
                "[select]\n", f"[select]\ncuration_selectors = {json.dumps(own_selectors())}\n"
            )
        )
        return [*base, "select", "--config", str(own), "--run", str(run), "--quiet", "--force"]
    if stage == "export":
        export = run.parent / f"{run.name}-export"
        shutil.rmtree(export, ignore_errors=True)
        return [
            *base,
            "select",
            "--config",
            str(config),
            "--run",
            str(run),
            "--export",
            str(export),
            "--force",
        ]
    return [*base, stage, "--config", str(config), "--run", str(run), "--quiet"]


def measure_stages(
    root: Path,
    rows: int,
    stages: list[str] = STAGES,
    config_text: str | None = None,
    seq_len: int = 16,
) -> dict:
    """Peak RSS and wall time of each stage on a synthetic corpus of about ``rows`` rows of
    ``seq_len`` bytes (``config_text`` must use the same ``prepare.seq_len``)."""
    inputs = root / f"docs-{rows}"
    made = write_documents(inputs, rows, seq_len)
    config = root / "recipe.toml"
    config.write_text(config_text or recipe(seq_len=seq_len))
    run = root / f"run-{rows}"
    env = {**os.environ, "GRASP_PROGRESS": "0", "PYTHONPATH": str(REPO)}
    env.pop("GRASP_DEBUG", None)
    figures = {"rows_target": rows, **made, "stages": {}}
    for stage in stages:
        figures["stages"][stage] = result = run_measured(
            grasp_command(stage, config, run, inputs), env
        )
        if stage == "prepare":
            from grasp_cli.artifacts.manifest import read_manifest

            figures["rows"] = read_manifest(run / "corpus").extra["rows"]
        result.pop("stdout")
    return figures


def throughput(root: Path, megabytes: float) -> dict:
    """``grasp prepare`` on about ``megabytes`` MB of jsonl (one process, one shard), against a
    plain read of the same files and a plain ``json.loads`` of every line."""
    rows = int(megabytes * 1e6 / 80)  # about 80 bytes of jsonl per 64-byte row
    inputs = root / "throughput"
    made = write_documents(inputs, rows, seq_len=64, files=8, seed=1)
    config = root / "throughput.toml"
    config.write_text(recipe(seq_len=64))
    run = root / "run-throughput"
    env = {**os.environ, "GRASP_PROGRESS": "0", "PYTHONPATH": str(REPO)}
    result = run_measured(grasp_command("prepare", config, run, inputs), env)
    from grasp_cli.artifacts.manifest import read_manifest

    read = plain_read(inputs)
    wall, mb = result["wall_s"], read["bytes"] / 1e6
    corpus_rows = read_manifest(run / "corpus").extra["rows"]
    shutil.rmtree(run, ignore_errors=True)
    return {
        "documents": made["documents"],
        "rows": corpus_rows,
        "megabytes": mb,
        "wall_s": wall,
        "peak_rss_mib": result["peak_rss_mib"],
        "docs_per_s": made["documents"] / wall,
        "mb_per_s": mb / wall,
        "plain_read_s": read["read_s"],
        "plain_parse_s": read["parse_s"],
        "ratio_to_plain_read": wall / read["read_s"],
        "ratio_to_plain_parse": wall / read["parse_s"],
    }


def plain_read(folder: Path) -> dict:
    """Seconds to read every byte of the files (1 MiB blocks), and to parse every line."""
    files = sorted(folder.glob("*.jsonl"))
    t0 = time.perf_counter()
    total = 0
    for path in files:
        with open(path, "rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 20), b""):
                total += len(block)
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for path in files:
        with open(path, "rb") as handle:
            for line in handle:
                json.loads(line)
    return {"bytes": total, "read_s": read_s, "parse_s": time.perf_counter() - t0}


def bench_select(n: int, k: int, tmp: Path) -> dict:
    """``stream_select`` at N = ``n`` on synthetic sketches (as ``bench_select.py``)."""
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_select

    t0 = time.perf_counter()
    arr = bench_select.write_sketches(tmp / "phi.zarr", n, k, 65_536, 0, compressed=False)
    write_s = time.perf_counter() - t0
    try:
        run = bench_select.run_size(
            arr, n, k, max(1, n // 10), 262_144, 20, 0, 10.0, False, repeats=1
        )
    finally:
        shutil.rmtree(tmp / "phi.zarr", ignore_errors=True)
    run["write_s"] = write_s
    run.pop("history", None)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=200_000, help="corpus rows of the small run")
    parser.add_argument("--factor", type=int, default=10, help="the large run has factor·N rows")
    parser.add_argument("--select-n", type=int, default=10_000_000, help="rows for select")
    parser.add_argument("--prepare-mb", type=float, default=100.0, help="MB of jsonl for prepare")
    parser.add_argument("--k", type=int, default=128, help="sketch dimension for select")
    parser.add_argument("--tmp", default=None, help="folder for the temporary runs")
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1, user_api="blas")
    except ImportError:
        pass
    tmp = Path(tempfile.mkdtemp(prefix="bench_scale_", dir=args.tmp))
    figures: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "n": args.n,
        "factor": args.factor,
    }
    try:
        small = measure_stages(tmp, args.n)
        large = measure_stages(tmp, args.n * args.factor)
        figures["small"], figures["large"] = small, large
        growth = {}
        print(
            f"{'stage':<16} {'peak RSS N':>12} {'peak RSS ' + str(args.factor) + 'N':>12} {'growth':>8}"
        )
        for stage in STAGES:
            a = small["stages"][stage]["peak_rss_mib"]
            b = large["stages"][stage]["peak_rss_mib"]
            growth[stage] = b / a - 1.0
            print(f"{stage:<16} {a:>10.1f} MiB {b:>10.1f} MiB {100 * growth[stage]:>+7.1f}%")
        figures["rss_growth"] = growth
        figures["prepare"] = throughput(tmp, args.prepare_mb)
        p = figures["prepare"]
        print(
            f"prepare {p['megabytes']:.0f} MB: {p['documents']:,} documents ({p['rows']:,} rows) in "
            f"{p['wall_s']:.1f}s: {p['docs_per_s']:,.0f} docs/s, {p['mb_per_s']:.2f} MB/s; plain read "
            f"{p['plain_read_s']:.2f}s ({p['ratio_to_plain_read']:.0f}x), plain json parse "
            f"{p['plain_parse_s']:.2f}s ({p['ratio_to_plain_parse']:.1f}x)"
        )
        if args.select_n > 0:
            figures["select"] = sel = bench_select(args.select_n, args.k, tmp)
            print(
                f"select N={args.select_n:,} k={args.k}: {sel['stream_wall_s']:.1f}s in "
                f"{sel['passes']} passes (converged={sel['converged']}); one plain read "
                f"{sel['floor_pass_s']:.1f}s; ratio {sel['ratio_to_floor']:.1f}x"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=float))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
