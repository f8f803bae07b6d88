"""A finished (or partial) run as Python objects: ``grasp_cli.load_run(DIR)``.

    >>> run = grasp_cli.load_run("runs/demo")
    >>> run.evaluation().to_pandas()          # held-out Spearman per method and task
    >>> phi = run.sketches().train[:1000]      # the first 1000 sketch rows (verified reads)
    >>> run.selection().column("id")           # the selected corpus ids

Every accessor reads one artifact through the same checked readers the stages use (complete,
digests verified) and returns Arrow tables, NumPy arrays or plain dicts; nothing is cached and
no torch is imported. An artifact that does not exist (yet) raises ``InputError`` naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from grasp_cli.artifacts.layout import RunLayout
from grasp_cli.artifacts.manifest import Manifest, read_manifest
from grasp_cli.artifacts.tables import read_table
from grasp_cli.errors import InputError


@dataclass(frozen=True)
class Run:
    """The artifacts of one run directory (see README: "Run directory and formats")."""

    root: Path

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.root)

    def manifest(self, artifact: str) -> Manifest | None:
        """An artifact's manifest (None when it does not exist)."""
        return read_manifest(self.layout.path(artifact))

    def _complete(self, artifact: str) -> Path:
        folder = self.layout.path(artifact)
        manifest = read_manifest(folder)
        if manifest is None or not manifest.complete:
            raise InputError(f"{folder}: missing or incomplete (see `grasp status`)")
        return folder

    def config(self) -> dict[str, Any]:
        """``RUN/config.toml`` as a dict (the configuration the artifacts were made with)."""
        from grasp_cli.config import read_run_config

        return read_run_config(self.root)

    def corpus(self, columns: list[str] | None = None) -> pa.Table:
        """The corpus rows (``columns`` to read only some: e.g. ``["id", "domain"]``)."""
        folder = self._complete("corpus")
        return pa.concat_tables(
            [read_table(p, columns) for p in sorted(folder.glob("part-*.parquet"))]
        )

    def tasks(self) -> dict[str, pa.Table]:
        folder = self._complete("tasks")
        return {p.stem: read_table(p) for p in sorted(folder.glob("*.parquet"))}

    def sketches(self):
        """``artifacts.sketches.Sketches``: ``train`` [N, k] (read by row slices), ``ids``,
        ``residuals`` [T, k], ``task_names``, and TRAK's arrays when they were computed."""
        from grasp_cli.artifacts.sketches import open_sketches

        return open_sketches(self._complete("sketches"))

    def subsets(self):
        """``artifacts.subsets.Subsets``: packed membership [M, N/8], roles, designs."""
        from grasp_cli.artifacts.subsets import read_subsets

        return read_subsets(self._complete("subsets"))

    def retrain(self) -> pa.Table:
        """Every training run's measured task metrics (``subset_id, role, task, metric, value,
        seed, steps, wall_s``)."""
        from grasp_cli.artifacts.results import read_results

        return read_results(self._complete("retrain"))

    def curation(self) -> pa.Table:
        from grasp_cli.artifacts.results import read_results

        return read_results(self._complete("curation"))

    def surrogate(self):
        """``surrogate.store.StoredSurrogate``: the fitted GRASP model and ``params.json``."""
        from grasp_cli.surrogate.store import load_surrogate

        return load_surrogate(self._complete("surrogate"))

    def params(self) -> dict[str, Any]:
        return json.loads((self._complete("surrogate") / "params.json").read_text())

    def _surrogate_table(self, name: str) -> pa.Table:
        return read_table(self._complete("surrogate") / f"{name}.parquet")

    def evaluation(self) -> pa.Table:
        return self._surrogate_table("evaluation")

    def comparison(self) -> pa.Table:
        return self._surrogate_table("comparison")

    def lcb(self) -> pa.Table:
        return self._surrogate_table("lcb")

    def predictions(self) -> pa.Table:
        return self._surrogate_table("predictions")

    def subset_scores(self) -> pa.Table:
        return read_table(self._complete("scores") / "subsets.parquet")

    def example_scores(self) -> pa.Table:
        folder = self._complete("scores") / "examples"
        return pa.concat_tables([read_table(p) for p in sorted(folder.glob("part-*.parquet"))])

    def selection(self) -> pa.Table:
        return read_table(self._complete("selection") / "selected.parquet")


def load_run(root: str | Path) -> Run:
    """The run directory ``root`` as a ``Run`` (its artifacts are read on access)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: not a run directory")
    return Run(root)
