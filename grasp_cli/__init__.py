"""grasp: subset-level training-data attribution and data selection (GRASP, arXiv 2606.06892).

``grasp_cli.load_run(DIR)`` opens a run directory's artifacts from Python (``grasp_cli.runs``).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_run", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so `grasp --help` and `import grasp_cli` stay light (no pyarrow/torch at import).
    if name in ("load_run", "Run"):
        from grasp_cli import runs

        return getattr(runs, name)
    raise AttributeError(f"module 'grasp_cli' has no attribute {name!r}")
