"""What the readers hand to prepare's stream: inputs (``Source``) that yield units (``Unit``).

A ``Source`` is one input file (or one piece of a built-in demo); the stream reads sources
one at a time and a source reads its units one at a time, so nothing holds more than the
unit at hand. Shards of ``grasp prepare --shard I --num-shards N`` split the sources.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np


@dataclass
class Unit:
    """One document or image: it lands in the corpus or in a task, never both.

    ``doc`` is its id (the ``doc`` column; unique over the inputs); ``where`` says where it
    was read (``file:line``), for messages. ``blocks`` yields its rows as field arrays
    (``{"tokens": int32 [R, W]}`` or ``{"image": uint8 [R, ...], "label": int64 [R]}``), in
    pieces for a long text. ``digest`` (text only) is the sha1 of its text, known once
    ``blocks`` is consumed. ``skip`` marks a unit that is read but holds nothing (an empty
    document): its id still counts against duplicates. ``key`` is what the seeded decisions
    hash (``doc`` when empty): an id made of a path drops the folder the user named, so the
    same data gives the same split wherever it is stored.
    """

    doc: str
    domain: str
    where: str
    blocks: Iterable[dict[str, np.ndarray]]
    digest: bytes = b""
    skip: bool = False
    key: str = ""

    @property
    def name(self) -> str:
        """The name the seeded keys are taken of."""
        return self.key or self.doc


@dataclass(frozen=True)
class Source:
    """One input: ``units()`` streams its units. ``size`` (bytes) balances shards; ``stamp``
    identifies its content for the prepare plan (path, size and modification time)."""

    name: str
    size: int
    stamp: str
    units: Callable[[], Iterator[Unit]]
