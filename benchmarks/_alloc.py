"""Keep freed CPU memory in the process (glibc), so that timings measure compute, not page faults.

PyTorch's CPU allocator hands large blocks straight to glibc, which returns them to the kernel on
free (mmap/trim); a method that runs right after one with a different memory profile then pays
for faulting fresh pages in, and interleaved timings depend on the order of the methods. Raising
glibc's mmap and trim thresholds keeps freed blocks for reuse — the behaviour CUDA's caching
allocator has on GPUs. No effect where glibc is not the C library.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Returns whether the setting took effect."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20) == 1
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2**30) == 1
        return bool(ok)
    except (OSError, AttributeError):
        return False
