"""Atomic writes: build under a temporary name in the same directory, then rename.

A job killed mid-write leaves only ``*.tmp-*`` debris, never a file or folder
under the final name; ``sweep_debris`` clears that debris on the next run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write a file at; it becomes ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces ``path`` (old contents removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``, replacing ``dst`` if it exists (old one renamed, then removed)."""
    trash = None
    if dst.exists():
        trash = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, trash)
    os.replace(src, dst)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def sweep_debris(folder: Path, min_age_s: float = 0.0) -> None:
    """Remove leftovers of interrupted atomic writes directly inside ``folder``.

    ``min_age_s`` spares debris modified more recently than that: where other jobs may be
    writing into ``folder`` at the same time, their in-progress temporaries look exactly
    like debris.
    """
    if not Path(folder).is_dir():
        return
    now = time.time()
    for entry in Path(folder).iterdir():
        if entry.name.startswith(".") and (".tmp-" in entry.name or ".old-" in entry.name):
            if min_age_s > 0:
                try:
                    if now - entry.stat().st_mtime < min_age_s:
                        continue
                except FileNotFoundError:  # its owner finished with it meanwhile
                    continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
