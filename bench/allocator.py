"""glibc malloc settings for timing on CPU.

By default glibc returns freed memory above its trim threshold to the OS, and serves large
allocations with fresh mmaps; every later allocation then page-faults its memory back in. On
this VM a 4 KiB page fault costs ~1.7 us, so a forward that keeps its activations (a cache:
~360 MiB for GPT-2 small at 4x128) paid ~100 ms of page faults per call, more than the
arithmetic it added, while a forward that frees as it goes (HF's) paid less. ``retain`` keeps
freed memory in the heap (M_TRIM_THRESHOLD and M_MMAP_THRESHOLD set to 1 GiB), the steady state
of a process that runs forwards in a loop, for every contender alike; ``default`` leaves glibc
as it is. results.json records which was in effect.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MODES = ("retain", "default")


def apply(mode: str) -> str:
    """Apply a malloc mode; returns what happened, in words, for the report."""
    if mode == "default":
        return "default (glibc's own thresholds)"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1 and libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError) as error:
        return f"default (could not set glibc thresholds: {error})"
    return "retain (glibc trim and mmap thresholds 1 GiB)" if ok else "default (mallopt refused)"
