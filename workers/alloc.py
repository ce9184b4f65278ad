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

    glibc's defaults hand freed memory back to the kernel after every host, which faults it
    in again for the next, and Arrow's own pool keeps a second reserve; so Arrow allocates
    through malloc, and malloc keeps up to 256 MiB free and serves blocks under 32 MiB from
    its heap. One malloc arena for every thread: glibc gives threads that allocate at once
    arenas of their own, each keeping its own free memory (the embedded runner's load and
    finalize threads held two hosts' worth). Figures: bench/README.md, "What changed", 4, and
    "Memory". Linux with glibc only; CCARCHIVE_MALLOC_TUNING=0 leaves defaults.
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
