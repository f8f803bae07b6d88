"""The `grasp` command line: a thin layer that parses flags and calls the library.

Every command is built from the ``STAGES`` table (``stages.py``) with one shared set of
options: ``grasp STAGE [--config FILE] [--run DIR] [--set section.key=value]... [--dry-run]
[--force] [--quiet]``; sharded stages also ``[--shard I --num-shards N]``. Exit codes: 0 ok,
1 failure, 2 bad usage or bad input. ``GRASP_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import copy
import errno
import inspect
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from grasp_cli import __version__
from grasp_cli.artifacts.layout import RunLayout
from grasp_cli.artifacts.shards import resolve_shard
from grasp_cli.config import config_changes, describe, load_config, parse_overrides
from grasp_cli.context import StageContext
from grasp_cli.errors import GraspError, UsageError, first_line
from grasp_cli.memory import STREAMING_STAGES, release_freed_blocks
from grasp_cli.stages import STAGES, Flag, Stage

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="grasp: subset-level training-data attribution and data selection (GRASP, arXiv 2606.06892).",
    pretty_exceptions_enable=False,
)

DEFAULT_RUN = Path("runs/default")

COMMON = (
    Flag("config", Path | None, None, "TOML recipe (see configs/).", ("--config", "-c")),
    Flag("run", Path, DEFAULT_RUN, "Run directory holding all artifacts.", ("--run", "-r")),
    Flag(
        "set_",
        list[str] | None,
        None,
        "Override a config value: section.key=value (repeatable).",
        ("--set",),
    ),
    Flag("quiet", bool, False, "No progress output.", ("--quiet", "-q")),
)
WRITING = (
    Flag(
        "dry_run",
        bool,
        False,
        "Print the resolved config and artifacts, then exit.",
        ("--dry-run",),
    ),
    Flag("force", bool, False, "Use stale inputs / redo finished work.", ("--force",)),
)
SHARDED = (
    Flag(
        "shard",
        int | None,
        None,
        "This job's shard index (default: SLURM_ARRAY_TASK_ID).",
        ("--shard",),
    ),
    Flag(
        "num_shards",
        int | None,
        None,
        "Number of shards (default: SLURM_ARRAY_TASK_COUNT).",
        ("--num-shards",),
    ),
)


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


def make_context(stage: Stage, flags: dict[str, Any]) -> StageContext:
    """Config (file, ``--set``, then the stage's own config flags), run layout, shard."""
    run = Path(flags["run"])
    if run.exists() and not run.is_dir():
        raise UsageError(f"--run {run}: exists and is not a folder; a run directory is a folder")
    # prepare states its corpus afresh (its inputs are its flags); every later stage starts
    # from what the run recorded.
    fresh = ("prepare",) if stage.name == "prepare" else ()
    config = load_config(
        flags["config"], flags["set_"] or [], run=run if run.is_dir() else None, fresh=fresh
    )
    command_line = parse_overrides(flags["set_"] or [])
    if stage.configure is not None:
        before = copy.deepcopy(config)
        stage.configure(config, flags)
        for section, keys in config_changes(before, config).items():
            command_line.setdefault(section, {}).update(keys)
    return StageContext(
        config=config,
        layout=RunLayout(run),
        force=bool(flags.get("force", False)),
        shard=resolve_shard(flags.get("shard"), flags.get("num_shards")),
        progress=not flags["quiet"] and os.environ.get("GRASP_PROGRESS", "1") != "0",
        command_line=command_line,
    )


RUN_CONFIG_HEADER = """\
# The configuration this run's artifacts were made with, written by each stage for its own
# sections. Every later stage and `grasp status` start from it; then --config FILE, then the
# keys remembered from earlier command lines ([command_line.*]: flags and --set, which stay in
# force over the file until set again), then this command's --set and flags.

"""


def record_run_config(ctx: StageContext, artifacts: list[str]) -> None:
    """Write the config sections the stage's artifacts were made with into ``RUN/config.toml``
    (merged with what earlier stages recorded), and remember the keys this command set on its
    command line within those sections (``[command_line]``)."""
    from grasp_cli.artifacts.atomic import atomic_write_text, creation_lock
    from grasp_cli.artifacts.layout import ARTIFACTS
    from grasp_cli.config import (
        COMMAND_LINE,
        RUN_CONFIG,
        GraspConfig,
        apply_run_config,
        command_line_toml,
        read_run_config,
        to_toml,
    )

    sections = sorted({s for a in artifacts for s in ARTIFACTS[a][1]})
    if not sections or not ctx.layout.root.is_dir():
        return
    path = ctx.layout.root / RUN_CONFIG
    with creation_lock(path):
        recorded = read_run_config(ctx.layout.root)
        merged = GraspConfig()
        apply_run_config(merged, recorded, ctx.layout.root)
        for name in sections:
            setattr(merged, name, getattr(ctx.config, name))
        remembered = {k: dict(v) for k, v in recorded.get(COMMAND_LINE, {}).items()}
        if "prepare" in sections:  # prepare states its corpus afresh: its old flags go
            remembered.pop("prepare", None)
        for name in sections:
            remembered.setdefault(name, {}).update(ctx.command_line.get(name, {}))
        written = sorted((set(recorded) - {COMMAND_LINE}) | set(sections))
        text = RUN_CONFIG_HEADER + to_toml(merged, written) + command_line_toml(remembered)
        atomic_write_text(path, text)


def dry_run_text(stage: Stage, ctx: StageContext, flags: dict[str, Any]) -> str:
    lines = [describe(ctx.config)]
    lines.append(f"# stage: {stage.artifact_owner(flags)}   run: {ctx.layout.root}   {ctx.shard}")
    lines += [f"# reads:  {ctx.layout.path(name)}" for name in stage.reads(flags)]
    lines += [f"# writes: {ctx.layout.path(name)}" for name in stage.writes(flags)]
    return "\n".join(lines)


def run_stage(stage: Stage, flags: dict[str, Any]) -> None:
    ctx = make_context(stage, flags)
    stage_flags = {f.name: flags[f.name] for f in stage.flags}
    if flags.get("dry_run"):
        typer.echo(dry_run_text(stage, ctx, stage_flags))
        return
    if stage.name in STREAMING_STAGES:  # freed stream blocks go back to the OS (memory.py)
        release_freed_blocks()
    result = stage.function()(ctx, **stage.run_flags(stage_flags))
    text, code = result if isinstance(result, tuple) else (result, 0)
    if stage.writes_artifacts and code == 0:
        record_run_config(ctx, stage.writes(stage_flags))
    typer.echo(text)
    if code:
        raise typer.Exit(code)


def _parameter(flag: Flag) -> inspect.Parameter:
    info = (
        typer.Argument(help=flag.help)
        if not flag.decl
        else typer.Option(*flag.decl, help=flag.help)
    )
    return inspect.Parameter(
        flag.name,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        default=flag.default,
        annotation=Annotated[flag.annotation, info],
    )


def register(stage: Stage) -> None:
    """Add ``stage`` to the app: its own flags first, then the shared options."""
    flags = [*stage.flags, *COMMON]
    if stage.writes_artifacts:
        flags += WRITING
    if stage.sharded:
        flags += SHARDED
    parameters = [_parameter(flag) for flag in flags]

    def command(**kwargs: Any) -> None:
        run_stage(stage, kwargs)

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    command.__doc__ = stage.help
    command.__name__ = stage.name.replace("-", "_")
    app.command(stage.name, help=stage.help)(command)


for _stage in STAGES:
    register(_stage)


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
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 1
    except OSError as exc:
        if debug:
            raise
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            typer.echo(f"error: {exc.filename or 'a file'}: {exc.strerror}", err=True)
            return 1
        return _unexpected(exc)
    except Exception as exc:  # click usage errors (typer vendors click) and anything unexpected
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()  # a usage error: bad flag, missing argument (exit code 2)
            return exc.exit_code
        if debug:
            raise
        return _unexpected(exc)
    return 0


def _unexpected(exc: BaseException) -> int:
    first = first_line(exc) if str(exc).strip() else ""
    typer.echo(
        f"error: {type(exc).__name__}: {first} (GRASP_DEBUG=1 shows the traceback)", err=True
    )
    return 1


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
