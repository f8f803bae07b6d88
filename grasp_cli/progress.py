"""Progress for long work: a bar on a terminal, one timestamped log line per step elsewhere.

Under SLURM (or any redirect) a tqdm bar writes ``\\r`` updates into the log file; there
``Progress`` writes one line per finished step through the stdlib ``logging`` module
instead (``2026-12-01 23:50:02 grasp sketch shard 1/2: 3/10 units (1024 rows, 2.1 s)``),
at most every ``min_interval_s`` seconds plus the last step. ``enabled=False`` (``--quiet``)
silences both. Library code never prints progress itself: stages create a ``Progress``.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

LOG = logging.getLogger("grasp")


def _configure_logging() -> None:
    if not LOG.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        LOG.addHandler(handler)
        LOG.setLevel(logging.INFO)
        LOG.propagate = False


def is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """``update(n)`` after each step of ``total``; ``close()`` at the end (also a context manager).

    unit: what a step counts ("rows", "runs", "units"); desc: the stage and shard.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "units",
        enabled: bool = True,
        min_interval_s: float = 10.0,
    ) -> None:
        self.total, self.desc, self.unit = int(total), desc, unit
        self.enabled = enabled and total > 0
        self.done = 0
        self.started = time.perf_counter()
        self._last_log = -float("inf")
        self._min_interval = min_interval_s
        self._bar: Any = None
        if self.enabled and is_terminal():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, smoothing=0.1)
        elif self.enabled:
            _configure_logging()

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last_log >= self._min_interval or self.done >= self.total:
            self._last_log = now
            elapsed = now - self.started
            rate = f", {self.done / elapsed:.3g} {self.unit}/s" if elapsed > 0 else ""
            extra = f"; {note}" if note else ""
            LOG.info(
                f"grasp {self.desc}: {self.done}/{self.total} {self.unit} "
                f"({elapsed:.1f} s{rate}){extra}"
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def log(message: str, enabled: bool = True) -> None:
    """One timestamped line on stderr (a stage's milestone: θ0 trained, a pass finished)."""
    if enabled:
        _configure_logging()
        LOG.info(message)


def progress_steps(desc: str, enabled: bool = True):
    """An ``on_step(done, total, what)`` callback for library code that knows its step count
    only once it starts: a ``Progress`` made at the first call, told of each step."""
    state: dict[str, Progress] = {}

    def on_step(done: int, total: int, what: str) -> None:
        if "bar" not in state:
            state["bar"] = Progress(total, desc, unit="steps", enabled=enabled, min_interval_s=0)
        bar = state["bar"]
        bar.update(done - bar.done, note=what)
        if done >= total:
            bar.close()

    return on_step
