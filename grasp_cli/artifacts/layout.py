"""Where every artifact lives inside a run directory, and which stage makes it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from grasp_cli.errors import UsageError

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# grasp's own folder at the run's top (a sharded prepare's staging, the corpus row store); the
# same name as the bookkeeping folder inside every artifact: nothing under `_grasp/` is data.
BOOKKEEPING = "_grasp"
MANIFEST_NAME = f"{BOOKKEEPING}/manifest.json"  # inside every artifact folder
SCRATCH = BOOKKEEPING


def check_safe_name(name: str, what: str) -> str:
    """``name`` if it can be a file name inside the run (a task's ``tasks/<name>.parquet``):
    letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit, at most 128
    characters: no separators, no ``..``, no hidden or absolute names. Else a UsageError."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise UsageError(
            f"{what} {name!r} cannot be a file name: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit (no '/', no '..')"
        )
    return name


# artifact name -> (stage that writes it, config sections it depends on, artifacts it reads)
ARTIFACTS: dict[str, tuple[str, list[str], list[str]]] = {
    "corpus": ("prepare", ["prepare", "run"], []),
    "tasks": ("prepare", ["prepare", "run"], []),
    "reference": ("sketch", ["model", "reference", "run"], ["corpus"]),
    "sketches": ("sketch", ["model", "sketch", "run"], ["corpus", "tasks", "reference"]),
    "subsets": ("retrain-subsets", ["subsets", "run"], ["corpus"]),
    "retrain": ("retrain-subsets", ["model", "retrain", "run"], ["subsets", "tasks", "reference"]),
    "loop": ("retrain-subsets --loop", ["model", "retrain", "loop", "run"], ["tasks", "reference"]),
    "surrogate": (
        "fit-surrogate",
        ["surrogate", "run"],
        ["sketches", "subsets", "retrain", "loop"],
    ),
    "scores": ("score", ["score"], ["sketches", "surrogate"]),
    "selection": ("select", ["select"], ["sketches", "surrogate"]),
    "curation": (
        "retrain-subsets --curation",
        ["model", "retrain", "run"],
        ["selection", "tasks", "reference"],
    ),
    "report": ("report", [], ["surrogate"]),
}


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def path(self, artifact: str) -> Path:
        names = {
            "sketches": "sketches.zarr",
            "subsets": "subsets.zarr",
            "curation": "curation",
        }
        return self.root / names.get(artifact, artifact)

    @property
    def corpus(self) -> Path:
        return self.path("corpus")

    @property
    def tasks(self) -> Path:
        return self.path("tasks")

    @property
    def reference(self) -> Path:
        return self.path("reference")

    @property
    def sketches(self) -> Path:
        return self.path("sketches")

    @property
    def subsets(self) -> Path:
        return self.path("subsets")

    @property
    def retrain(self) -> Path:
        return self.path("retrain")

    @property
    def surrogate(self) -> Path:
        return self.path("surrogate")

    @property
    def scores(self) -> Path:
        return self.path("scores")

    @property
    def selection(self) -> Path:
        return self.path("selection")

    @property
    def curation(self) -> Path:
        return self.path("curation")

    @property
    def report(self) -> Path:
        return self.path("report")
