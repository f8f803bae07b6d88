"""Sketching: seeded JL projections of per-example gradients (the ``sketch`` stage's numerical core)."""

from grasp_cli.sketch.projections import KINDS, take_prefix
from grasp_cli.sketch.sketcher import Sketcher

__all__ = ["KINDS", "Sketcher", "take_prefix"]
