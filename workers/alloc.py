"""Process-wide memory allocator settings for the steps that move whole hosts through memory."""

from __future__ import annotations

import ctypes
import os
import sys

import pyarrow as pa

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters
_allocator_tuned = False


def tune_allocator() -> None:
    """Once per process: one allocator that keeps and reuses the memory freed between hosts.

    Loading or writing a host allocates and frees some 40 MB of temporaries, numpy's
    through malloc, Arrow's through its own pool (mimalloc in the wheels). By default
    glibc hands the top of its heap back to the kernel as soon as 128 KiB lie free and
    serves large blocks with fresh mappings, so every host faults the same pages in again:
    ~4,000 page faults, 10-15 ms of system time per host on the benchmark VM, a third of a
    JSON host's CPU time; and mimalloc keeps its own, separate reserve (finalize: +45 MB
    peak RSS, 10 % slower than Arrow's system pool). So: Arrow allocates with malloc too,
    and malloc keeps up to 256 MiB free and serves blocks under 32 MiB from its heap
    (bench/README.md). And one malloc arena for every thread: glibc gives threads that
    allocate at once arenas of their own, each keeping its own free memory, so the
    embedded runner's load and finalize threads held two hosts' worth of reserve (-15 MB
    peak RSS with one worker, bench/memory.py; no measurable CPU cost). Linux with glibc
    only; CCARCHIVE_MALLOC_TUNING=0 leaves defaults.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return
    _allocator_tuned = True
    if not sys.platform.startswith("linux") or os.environ.get("CCARCHIVE_MALLOC_TUNING") == "0":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        tuned = (
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            and libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
            # Threads that already have an arena keep it; those started later share one.
            and libc.mallopt(_M_ARENA_MAX, 1)
        )
    except (OSError, AttributeError):
        return  # not glibc (musl has no mallopt): keep every default
    if tuned:
        # Buffers already allocated keep their pool; only new ones come from malloc.
        pa.set_memory_pool(pa.system_memory_pool())
