"""The stages, as data: one shape for every command of the pipeline.

A ``Stage`` is a name, its help, the function that runs it (imported only when the stage
runs, so ``grasp --help`` never imports torch), its own flags, whether it is
sharded, and a ``configure`` hook that writes the flags that are configuration (``--budget``
is ``select.budget``) into the config before anything else sees it — so ``--dry-run`` shows
them and the run records them. What a stage reads and writes comes from the ``ARTIFACTS``
table. ``cli.py`` builds every command from ``STAGES`` with one shared set of options; every
``run(ctx, **flags)`` returns the text to print (or ``(text, exit_code)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grasp_cli.artifacts.layout import ARTIFACTS
from grasp_cli.config import GraspConfig, parse_budget, validate
from grasp_cli.errors import UsageError


@dataclass(frozen=True)
class Flag:
    """A stage's own command-line flag: ``decl`` are its names (empty: a positional argument)."""

    name: str
    annotation: Any
    default: Any
    help: str
    decl: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    load: Callable[[], Callable[..., Any]]  # imports the stage lazily; returns run(ctx, **flags)
    flags: tuple[Flag, ...] = ()
    sharded: bool = False
    writes_artifacts: bool = True  # False: status (no --force / --dry-run)
    configure: Callable[[GraspConfig, dict[str, Any]], None] | None = None
    config_flags: frozenset[str] = field(default_factory=frozenset)  # consumed by configure

    def function(self) -> Callable[..., Any]:
        return self.load()

    def artifact_owner(self, flags: dict[str, Any]) -> str:
        if flags.get("curation"):
            return "retrain-subsets --curation"
        if flags.get("loop"):
            return "retrain-subsets --loop"
        return self.name

    def writes(self, flags: dict[str, Any]) -> list[str]:
        owner = self.artifact_owner(flags)
        return [name for name, (stage, _, _) in ARTIFACTS.items() if stage == owner]

    def reads(self, flags: dict[str, Any]) -> list[str]:
        writes = self.writes(flags)
        return sorted({r for name in writes for r in ARTIFACTS[name][2] if r not in writes})

    def run_flags(self, flags: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in flags.items() if k not in self.config_flags}


# ---------------------------------------------------------------- flags that are configuration


def _configure_prepare(config: GraspConfig, flags: dict[str, Any]) -> None:
    section = config.prepare
    inputs, demo = flags.get("inputs"), flags.get("demo")
    if demo and inputs:
        raise UsageError("prepare: give INPUT files or --demo, not both")
    if demo:
        section.demo, section.demo_images = True, False
    if inputs:  # files on the command line replace whatever corpus the config names
        section.inputs = list(inputs)
        section.demo, section.demo_images = False, False
    for item in flags.get("task") or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--task {item!r}: expected NAME=PATH")
        section.tasks[name] = path
    if flags.get("holdout_domains"):
        domains = flags["holdout_domains"].split(",")
        section.holdout_domains = [d.strip() for d in domains if d.strip()]
    validate(config)  # the flags are config too: the same checks (names, leakage)


def _configure_sketch(config: GraspConfig, flags: dict[str, Any]) -> None:
    checkpoint = flags.get("checkpoint")
    if checkpoint is not None and Path(checkpoint).is_dir():
        raise UsageError(
            f"--checkpoint {checkpoint}: a folder; a Hugging Face save_pretrained folder is the "
            f"model itself: set model.kind = 'hf' and model.path = '{checkpoint}' in the config "
            "(every stage needs it)"
        )
    if checkpoint is not None:
        config.reference.checkpoint = str(checkpoint)


def _configure_score(config: GraspConfig, flags: dict[str, Any]) -> None:
    if flags.get("subsets") is not None:
        config.score.subsets = str(flags["subsets"])


def _configure_select(config: GraspConfig, flags: dict[str, Any]) -> None:
    if flags.get("budget") is not None:
        config.select.budget = parse_budget(flags["budget"])


# ---------------------------------------------------------------- the stage functions, imported lazily


def _prepare():
    from grasp_cli.prepare.stage import run_prepare_stage

    return run_prepare_stage


def _sketch():
    from grasp_cli.sketch.stage import run_sketch

    return run_sketch


def _retrain():
    from grasp_cli.retrain.stage import run_retrain

    return run_retrain


def _fit_surrogate():
    from grasp_cli.surrogate.stage import run_fit_surrogate

    return run_fit_surrogate


def _score():
    from grasp_cli.score.stage import run_score

    return run_score


def _select():
    from grasp_cli.select.stage import run_select

    return run_select


def _report():
    from grasp_cli.report.stage import run_report

    return run_report


def _status():
    from grasp_cli.status.stage import run_status

    return run_status


STAGES: tuple[Stage, ...] = (
    Stage(
        "prepare",
        "Documents in -> RUN/corpus (token shards) and RUN/tasks (one Parquet per target task).",
        _prepare,
        flags=(
            Flag(
                "inputs",
                list[str] | None,
                None,
                "Files, folders or globs: .txt/.jsonl/.parquet documents, or images (folders "
                "of PNG/JPEG, .npz, .parquet).",
            ),
            Flag(
                "demo",
                bool,
                False,
                "Build the offline demo corpus from Python's own text.",
                ("--demo",),
            ),
            Flag(
                "task",
                list[str] | None,
                None,
                "A target task: NAME=PATH (repeatable).",
                ("--task",),
            ),
            Flag(
                "holdout_domains",
                str | None,
                None,
                "Comma-separated domains to hold documents out of.",
                ("--holdout-domains",),
            ),
        ),
        sharded=True,
        configure=_configure_prepare,
        config_flags=frozenset({"inputs", "demo", "task", "holdout_domains"}),
    ),
    Stage(
        "sketch",
        "Per-example gradient sketches of the corpus and task residuals -> RUN/sketches.zarr.",
        _sketch,
        flags=(
            Flag(
                "checkpoint", Path | None, None, "θ0 state dict (weights_only).", ("--checkpoint",)
            ),
        ),
        sharded=True,
        configure=_configure_sketch,
        config_flags=frozenset({"checkpoint"}),
    ),
    Stage(
        "retrain-subsets",
        "Train on many subsets (fixed compute) and measure every task -> RUN/subsets.zarr, RUN/retrain/.",
        _retrain,
        flags=(
            Flag(
                "limit",
                int | None,
                None,
                "Train at most this many runs in this call.",
                ("--limit",),
            ),
            Flag(
                "curation",
                bool,
                False,
                "Train on the selections of `grasp select` (the curation check).",
                ("--curation",),
            ),
            Flag(
                "loop",
                bool,
                False,
                "Closed loop: measure the current selection and subsets near it (next round).",
                ("--loop",),
            ),
        ),
        sharded=True,
    ),
    Stage(
        "fit-surrogate",
        "Fit GRASP with the finite LCB protocol, evaluate it and the baselines -> RUN/surrogate/.",
        _fit_surrogate,
    ),
    Stage(
        "score",
        "Predicted utility of subsets and each example's marginal gain -> RUN/scores/.",
        _score,
        flags=(
            Flag(
                "subsets",
                Path | None,
                None,
                "Parquet of (subset_id, id) to score (default: the sampled subsets).",
                ("--subsets",),
            ),
        ),
        sharded=True,
        configure=_configure_score,
        config_flags=frozenset({"subsets"}),
    ),
    Stage(
        "select",
        "Pick the budget-B subset that maximizes the predicted task utility -> RUN/selection/.",
        _select,
        flags=(
            Flag(
                "budget",
                str | None,
                None,
                "A whole count (600) or a fraction of N in (0, 1] (0.25; 1.0 = all).",
                ("--budget", "-b"),
            ),
            Flag(
                "export",
                Path | None,
                None,
                "Write the selected corpus to this folder (new, empty, or an earlier export; "
                "with --force, added beside another folder's files, never replacing any).",
                ("--export",),
            ),
        ),
        configure=_configure_select,
        config_flags=frozenset({"budget"}),
    ),
    Stage(
        "report",
        "An HTML report with plots of everything in the run -> RUN/report/index.html.",
        _report,
    ),
    Stage(
        "status",
        "What exists in the run, what is stale or damaged, and which units are missing.",
        _status,
        flags=(
            Flag(
                "check",
                bool,
                False,
                "Exit 1 unless every artifact is ok (missing, incomplete, stale or damaged).",
                ("--check",),
            ),
            Flag(
                "json_out",
                bool,
                False,
                "Print the state as one JSON document (run, complete, artifacts: state, detail, "
                "stage, path, missing_units).",
                ("--json",),
            ),
        ),
        writes_artifacts=False,
    ),
)


def stage_named(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(name)
