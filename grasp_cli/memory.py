"""Make freed memory go back to the operating system, so peak RSS tracks what a stage holds.

Stages stream the corpus and the sketch array in blocks of megabytes (a 65,536-row block of
sketches, a Parquet row group), read in reader threads. glibc's allocator raises its mmap
threshold each time such a block is freed (up to 32 MiB on 64-bit), after which blocks of
that size come from the heap and from per-thread arenas, where freed space is kept for
reuse rather than returned: the resident set then climbs by many blocks before it levels
off, which reads as memory growing with the corpus. Pinning the threshold
(``M_MMAP_THRESHOLD``, which also turns its adjustment off) makes every allocation above it
an ``mmap`` that ``free`` unmaps at once. Measured on a 806,218-row sketch array read in
16 MiB blocks: RSS climbed 229 -> 327 MiB without it, stayed at 229-260 MiB with it.

Only the stages that stream large blocks through NumPy and Parquet pin it
(``STREAMING_STAGES``): in torch training every step allocates and frees tensors above 1 MiB,
and mapping them afresh each time made ``retrain-subsets`` 35 % slower on the demo (556 vs 746
runs/hour, 6 runs each way); ``sketch`` and ``retrain-subsets`` keep glibc's default.

``GRASP_MMAP_THRESHOLD`` (bytes; 0 leaves the allocator alone) overrides the 1 MiB default.
Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
STREAMING_STAGES = frozenset({"prepare", "fit-surrogate", "score", "select"})
DEFAULT_THRESHOLD = 1 << 20


def release_freed_blocks() -> bool:
    """Pin glibc's mmap threshold (see the module docstring); True when it was set."""
    try:
        threshold = int(os.environ.get("GRASP_MMAP_THRESHOLD", DEFAULT_THRESHOLD))
    except ValueError:
        threshold = DEFAULT_THRESHOLD
    if threshold <= 0:
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
