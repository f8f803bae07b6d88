"""The reference implementations grasp is compared with, run beside its own baselines.

Optional: ``pip install grasp-cli[anchors]`` brings the authors' packages (``traker`` for
TRAK, ``data-selection`` for DSIR). Each module imports its package lazily and says how to
install it when it is missing; nothing else in grasp needs them.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

from grasp_cli.errors import UsageError

ANCHORS_EXTRA = "pip install 'grasp-cli[anchors]'"


def missing(package: str, what: str) -> UsageError:
    """The error for an anchor whose package is not installed."""
    return UsageError(f"{what} needs the package {package!r}: {ANCHORS_EXTRA}")


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Swallow what a reference package writes to stderr (tqdm bars, log lines) while it runs;
    its exceptions still propagate."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield
