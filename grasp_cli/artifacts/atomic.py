"""Atomic writes: build under a temporary name in the same directory, then rename.

A job killed mid-write leaves only ``*.tmp-*`` debris, never a file or folder
under the final name; ``sweep_debris`` clears that debris on the next run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import sys
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


_NO_LOCKS = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK}


@contextlib.contextmanager
def creation_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``.<name>.lock`` beside ``folder``: concurrent jobs (shards of an
    array) decide one at a time whether to reuse, create or replace a shared artifact.

    On a file system without locks (Lustre mounted without ``-o flock``) it warns once and goes
    on unlocked: writes stay atomic, only concurrent *creation* of one artifact is unguarded.
    """
    lock_path = Path(folder).parent / f".{Path(folder).name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                raise
            print(
                f"warning: no file locks on {lock_path.parent} ({exc.strerror}); "
                "mount with -o flock for safe concurrent shards",
                file=sys.stderr,
            )
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
