"""Atomic writes: build under a temporary name in the same directory, then rename.

A job killed mid-write leaves only ``.<name>.tmp-*`` (or ``.<name>.old-*``) debris, never a
file or folder under the final name. ``sweep_debris(folder, names)`` clears the debris of
the named artifacts only, so a run directory shared with other files is never touched
beyond grasp's own leftovers. A full disk is reported naming the path being written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from grasp_cli.errors import GraspError

# OS errors that mean "the storage cannot take this write", not "grasp has a bug".
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


class StorageError(GraspError):
    """A write failed for lack of space (or a read-only / over-quota file system). Exit 1."""


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a full disk (ENOSPC, EDQUOT, EROFS, EFBIG) inside the block into a ``StorageError``
    that names the file being written (or ``path`` when the OS did not say which)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _STORAGE_ERRNOS and "No space left on device" not in str(exc):
            raise
        reason = exc.strerror or "No space left on device"
        raise StorageError(
            f"{final_path(path)}: {reason} while writing it; free space or choose another --run"
        ) from None


_TMP_PART = re.compile(r"^\.(.+)\.tmp-[0-9a-f]{8}$")


def final_path(path: Path) -> Path:
    """The path a file being built under a temporary name will have: every ``.<name>.tmp-X``
    component (a file's or an enclosing folder's) replaced by ``<name>``."""
    parts = [
        (_TMP_PART.match(part).group(1) if _TMP_PART.match(part) else part)
        for part in Path(path).parts
    ]
    return Path(*parts)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with writing(path), open(tmp, "wb") as handle:
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
        with writing(path):
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
    with writing(path):
        tmp.mkdir()
    try:
        with writing(path):
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


def debris_pattern(name: str) -> re.Pattern[str]:
    """What an interrupted atomic write of ``name`` leaves beside it: ``.<name>.tmp-XXXXXXXX``
    (the half-built new version) or ``.<name>.old-XXXXXXXX`` (the old one being replaced)."""
    return re.compile(rf"^\.{re.escape(name)}\.(?:tmp|old)-[0-9a-f]{{8}}$")


def sweep_debris(
    folder: Path, names: Iterable[str] | None = None, min_age_s: float = 0.0
) -> list[Path]:
    """Remove leftovers of interrupted atomic writes of ``names`` directly inside ``folder``.

    ``names`` are the file or folder names whose debris may go (``None``: any grasp debris,
    for folders grasp owns entirely, such as an artifact's own folder). Nothing else is ever
    touched. ``min_age_s`` spares debris modified more recently than that: where other jobs
    may be writing into ``folder`` at the same time, their in-progress temporaries look
    exactly like debris. Returns what was removed.
    """
    if not Path(folder).is_dir():
        return []
    patterns = (
        [debris_pattern(name) for name in names]
        if names is not None
        else [re.compile(r"^\..+\.(?:tmp|old)-[0-9a-f]{8}$")]
    )
    now = time.time()
    removed = []
    for entry in Path(folder).iterdir():
        if not any(p.match(entry.name) for p in patterns):
            continue
        if min_age_s > 0:
            try:
                if now - entry.lstat().st_mtime < min_age_s:
                    continue
            except FileNotFoundError:  # its owner finished with it meanwhile
                continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def artifact_dir(path: Path) -> Iterator[Path]:
    """``atomic_dir`` for a whole-artifact folder written by one stage: under the artifact's
    creation lock, first sweep that artifact's own debris (earlier killed writes), then build
    the new version in a temporary folder and swap it in."""
    path = Path(path)
    with creation_lock(path):
        sweep_debris(path.parent, [path.name])
        with atomic_dir(path) as tmp:
            yield tmp


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
