"""The `grasp` command line: a thin layer that parses flags and calls the library.

Every stage: ``grasp STAGE [--config FILE] [--run DIR] [--set section.key=value]...
[--dry-run] [--force]``; heavy stages also ``[--shard I --num-shards N]``.
Exit codes: 0 ok, 1 failure, 2 bad usage or bad input. ``GRASP_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from grasp_cli import __version__
from grasp_cli.artifacts.layout import ARTIFACTS, RunLayout
from grasp_cli.artifacts.shards import resolve_shard
from grasp_cli.config import describe, load_config, parse_budget, validate
from grasp_cli.context import StageContext
from grasp_cli.errors import GraspError, UsageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="grasp: subset-level training-data attribution and data selection (GRASP, arXiv 2606.06892).",
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML recipe (see configs/).")
]
RunOpt = Annotated[Path, typer.Option("--run", "-r", help="Run directory holding all artifacts.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value: section.key=value (repeatable)."),
]
DryOpt = Annotated[
    bool, typer.Option("--dry-run", help="Print the resolved config and artifacts, then exit.")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Use stale inputs / redo finished work.")]
ShardOpt = Annotated[
    int | None,
    typer.Option("--shard", help="This job's shard index (default: SLURM_ARRAY_TASK_ID)."),
]
NumShardsOpt = Annotated[
    int | None,
    typer.Option("--num-shards", help="Number of shards (default: SLURM_ARRAY_TASK_COUNT)."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]

DEFAULT_RUN = Path("runs/default")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"grasp {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """Predict how a model trained on any subset of a corpus would do on target tasks, and pick the best subset."""


def _context(
    config: Path | None,
    run: Path,
    overrides: list[str] | None,
    force: bool,
    shard: int | None = None,
    num_shards: int | None = None,
    quiet: bool = False,
) -> StageContext:
    if Path(run).exists() and not Path(run).is_dir():
        raise UsageError(f"--run {run}: exists and is not a folder; a run directory is a folder")
    return StageContext(
        config=load_config(config, overrides or []),
        layout=RunLayout(Path(run)),
        force=force,
        shard=resolve_shard(shard, num_shards),
        progress=not quiet and os.environ.get("GRASP_PROGRESS", "1") != "0",
    )


def _dry_run(ctx: StageContext, stage: str, extra_reads: list[str] | None = None) -> None:
    typer.echo(describe(ctx.config))
    writes = [name for name, (owner, _, _) in ARTIFACTS.items() if owner == stage]
    reads = sorted(
        {r for name in writes for r in ARTIFACTS[name][2] if r not in writes}
        | set(extra_reads or [])
    )
    typer.echo(f"# stage: {stage}   run: {ctx.layout.root}   {ctx.shard}")
    for name in reads:
        typer.echo(f"# reads:  {ctx.layout.path(name)}")
    for name in writes:
        typer.echo(f"# writes: {ctx.layout.path(name)}")


@app.command()
def prepare(
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            help="Files, folders or globs: .txt/.jsonl/.parquet documents, or images (folders of PNG/JPEG, .npz, .parquet)."
        ),
    ] = None,
    demo: Annotated[
        bool, typer.Option("--demo", help="Build the offline demo corpus from Python's own text.")
    ] = False,
    task: Annotated[
        list[str] | None, typer.Option("--task", help="A target task: NAME=PATH (repeatable).")
    ] = None,
    holdout_domains: Annotated[
        str | None,
        typer.Option("--holdout-domains", help="Comma-separated domains to hold documents out of."),
    ] = None,
    config: ConfigOpt = None,
    run: RunOpt = DEFAULT_RUN,
    set_: SetOpt = None,
    dry_run: DryOpt = False,
    force: ForceOpt = False,
    shard: ShardOpt = None,
    num_shards: NumShardsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Documents in -> RUN/corpus (token shards) and RUN/tasks (one Parquet per target task)."""
    ctx = _context(config, run, set_, force, shard, num_shards, quiet)
    section = ctx.config.prepare
    if demo and inputs:
        raise UsageError("prepare: give INPUT files or --demo, not both")
    if demo:
        section.demo, section.demo_images = True, False
    if inputs:  # files on the command line replace whatever corpus the config names
        section.inputs = list(inputs)
        section.demo, section.demo_images = False, False
    for item in task or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--task {item!r}: expected NAME=PATH")
        section.tasks[name] = path
    if holdout_domains:
        section.holdout_domains = [d.strip() for d in holdout_domains.split(",") if d.strip()]
    validate(ctx.config)  # the flags above are config too: same checks (names, leakage)
    if dry_run:
        return _dry_run(ctx, "prepare")
    from grasp_cli.prepare.stage import run_prepare

    result = run_prepare(ctx.config, ctx.layout, ctx.shard, ctx.force, ctx.progress)
    summary = result.summary
    if summary is None:
        typer.echo(result.message)
        return
    typer.echo(
        f"corpus: {summary.corpus_rows} {summary.unit} in {len(summary.domains)} domains -> {ctx.layout.corpus}\n"
        f"tasks:  "
        + ", ".join(f"{k} ({v})" for k, v in summary.tasks.items())
        + f" -> {ctx.layout.tasks}"
        + (f" ({result.message})" if result.message else "")
    )


@app.command()
def sketch(
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help="θ0 state dict (weights_only).")
    ] = None,
    config: ConfigOpt = None,
    run: RunOpt = DEFAULT_RUN,
    set_: SetOpt = None,
    dry_run: DryOpt = False,
    force: ForceOpt = False,
    shard: ShardOpt = None,
    num_shards: NumShardsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Per-example gradient sketches of the corpus and task residuals -> RUN/sketches.zarr."""
    ctx = _context(config, run, set_, force, shard, num_shards, quiet)
    if checkpoint is not None:
        ctx.config.reference.checkpoint = str(checkpoint)
    if dry_run:
        return _dry_run(ctx, "sketch")
    from grasp_cli.sketch.stage import run_sketch

    typer.echo(run_sketch(ctx))


@app.command("retrain-subsets")
def retrain_subsets(
    limit: Annotated[
        int | None, typer.Option("--limit", help="Train at most this many subsets in this call.")
    ] = None,
    curation: Annotated[
        bool,
        typer.Option(
            "--curation", help="Train on the selections of `grasp select` (the curation check)."
        ),
    ] = False,
    config: ConfigOpt = None,
    run: RunOpt = DEFAULT_RUN,
    set_: SetOpt = None,
    dry_run: DryOpt = False,
    force: ForceOpt = False,
    shard: ShardOpt = None,
    num_shards: NumShardsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Train on many subsets (fixed compute) and measure every task -> RUN/subsets.zarr, RUN/retrain/."""
    ctx = _context(config, run, set_, force, shard, num_shards, quiet)
    if dry_run:
        return _dry_run(ctx, "retrain-subsets --curation" if curation else "retrain-subsets")
    from grasp_cli.retrain.stage import run_curation, run_retrain

    typer.echo(run_curation(ctx, limit) if curation else run_retrain(ctx, limit))


@app.command("fit-surrogate")
def fit_surrogate(
    config: ConfigOpt = None,
    run: RunOpt = DEFAULT_RUN,
    set_: SetOpt = None,
    dry_run: DryOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fit GRASP with the finite LCB protocol, evaluate it and the baselines -> RUN/surrogate/."""
    ctx = _context(config, run, set_, force, quiet=quiet)
    if dry_run:
        return _dry_run(ctx, "fit-surrogate")
    from grasp_cli.surrogate.stage import run_fit_surrogate

    typer.echo(run_fit_surrogate(ctx))


@app.command()
def score(
    subsets: Annotated[
        Path | None,
        typer.Option("--subsets", help="Parquet of (subset_id, id) to score (default: sampled)."),
    ] = None,
    config: ConfigOpt = None,
    run: RunOpt = DEFAULT_RUN,
    set_: SetOpt = None,
    dry_run: DryOpt = False,
    force: ForceOpt = False,
    shard: ShardOpt = None,
    num_shards: NumShardsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Predicted utility of subsets and each example's marginal gain -> RUN/scores/."""
    ctx = _context(config, run, set_, force, shard, num_shards, quiet)
    if subsets is not None:
        ctx.config.score.subsets = str(subsets)
    if dry_run:
        return _dry_run(ctx, "score")
    from grasp_cli.surrogate.score_stage import run_score

    typer.echo(run_score(ctx))


@app.command()
def select(
    budget: Annotated[
        str | None,
        typer.Option(
            "--budget",
            "-b",
            help="A whole count (600) or a fraction of N in (0, 1] (0.25; 1.0 = all).",
        ),
    ] = None,
    export: Annotated[
        Path | None,
        typer.Option(
            "--export",
            help="Write the selected corpus to this folder (new, empty, or an earlier export; "
            "with --force, added beside another folder's files, never replacing any).",
        ),
    ] = None,
    config: ConfigOpt = None,
    run: RunOpt = DEFAULT_RUN,
    set_: SetOpt = None,
    dry_run: DryOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Pick the budget-B subset that maximizes the predicted task utility -> RUN/selection/."""
    ctx = _context(config, run, set_, force, quiet=quiet)
    if budget is not None:
        ctx.config.select.budget = parse_budget(budget)
    if dry_run:
        return _dry_run(ctx, "select")
    from grasp_cli.select.stage import run_select

    typer.echo(run_select(ctx, export))


@app.command()
def report(
    config: ConfigOpt = None,
    run: RunOpt = DEFAULT_RUN,
    set_: SetOpt = None,
    dry_run: DryOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """An HTML report with plots of everything in the run -> RUN/report/index.html."""
    ctx = _context(config, run, set_, force)
    if dry_run:
        return _dry_run(ctx, "report")
    from grasp_cli.report.stage import run_report

    typer.echo(run_report(ctx))


@app.command()
def status(
    config: ConfigOpt = None,
    run: RunOpt = DEFAULT_RUN,
    set_: SetOpt = None,
) -> None:
    """What exists in the run, what is stale, and which shards or units are missing."""
    ctx = _context(config, run, set_, force=False)
    from grasp_cli.status import run_status

    typer.echo(run_status(ctx))


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app and turn library errors into one line and an exit code."""
    debug = os.environ.get("GRASP_DEBUG", "") not in ("", "0")
    try:
        # Outside standalone mode, typer *returns* the exit code of an Exit (Ctrl-C is Exit(130)).
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and not isinstance(code, bool) and code != 0:
            if code == 130:
                typer.echo("interrupted", err=True)
            return code
    except GraspError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except OSError as exc:
        if debug or exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            if debug:
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            typer.echo(
                f"error: {type(exc).__name__}: {first} (GRASP_DEBUG=1 shows the traceback)",
                err=True,
            )
            return 1
        typer.echo(f"error: {exc.filename or 'a file'}: {exc.strerror}", err=True)
        return 1
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 1
    except Exception as exc:  # click usage errors (typer vendors click) and anything unexpected
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()  # a usage error: bad flag, missing argument (exit code 2)
            return exc.exit_code
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        typer.echo(
            f"error: {type(exc).__name__}: {first} (GRASP_DEBUG=1 shows the traceback)", err=True
        )
        return 1
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
