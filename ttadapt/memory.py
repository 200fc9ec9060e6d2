"""Keep freed CPU memory in the process (glibc), so that training steps do not page-fault.

PyTorch's CPU allocator hands every block to the C library. glibc serves a block of 32 MiB or
more by a fresh ``mmap`` whenever no free chunk of its heap is that large, returns it to the
kernel on ``free``, and trims the heap's free top above 128 KiB; the next step then faults
fresh pages in again, each zero-filled by the kernel. oneDNN's backward of a convolution with
many weights asks for such blocks (resnet18's 512-channel 3 × 3 convolutions: 72 MiB, eight
threads' worth of weight-gradient buffers, of which two threads touch 19 MiB), so on this
project's 2-core machine a plain resnet18 training step (batch 16 at 64 × 64, Adam) took about
16,000 page faults and 286–307 ms, against none and 251–278 ms with the memory kept, and an
AG-3 step about 31,000 faults and 396–437 ms against none and 323–373 ms
(``benchmarks/allocator.py``, three runs of each, 2026-11-30; a GPU has its own caching
allocator and no such cost).

:func:`keep_freed_memory` tells glibc to serve every block from its heap and to keep what is
freed there for reuse — what CUDA's caching allocator does on a GPU. The process's peak memory
stays what its peak use is (freed blocks are reused, not added to); memory freed after a peak is
kept by the process instead of going back to the system. The ``ttadapt`` command calls it at
start (``TTADAPT_KEEP_FREED_MEMORY=0`` in the environment leaves glibc as it is); the library
does not change the process's allocator by itself: call it at the start of a training or
adaptation script, or set ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1073741824``
before Python starts. Where the C library is not glibc it does nothing and returns False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

from .switches import switched_on

__all__ = ["keep_freed_memory", "keep_freed_memory_enabled"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**30  # a heap's free top up to 1 GiB stays in the process

#: whether :func:`keep_freed_memory` has taken effect in this process
kept = False


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (see the module docstring); returns whether it
    took effect (False off Linux or where the C library is not glibc). Calling it again is
    harmless."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    global kept
    ok = mallopt(_M_MMAP_MAX, 0) == 1  # no block by mmap, whatever its size: all from the heap
    ok &= mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    kept = kept or bool(ok)
    return bool(ok)


def keep_freed_memory_enabled() -> bool:
    """Whether the ``ttadapt`` command should call :func:`keep_freed_memory` at start
    (``TTADAPT_KEEP_FREED_MEMORY``, on unless 0 / false / no / off)."""
    return switched_on("TTADAPT_KEEP_FREED_MEMORY")
