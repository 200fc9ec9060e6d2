"""Peak bytes of tensors alive during a call, on any device (the CPU has no allocator stats).

A TorchDispatchMode sees every tensor an operator creates — forward, backward and the engine's
own — and a finalizer sees it die; views are counted once, through their base.
"""

from __future__ import annotations

import gc
import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _Tracker(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self.seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.seen.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t._base is None and id(t) not in self.seen:
                nbytes = t.untyped_storage().nbytes()
                if nbytes == 0:
                    continue
                self.seen.add(id(t))
                self.current += nbytes
                self.peak = max(self.peak, self.current)
                weakref.finalize(t, self._free, id(t), nbytes)
        return out


def peak_tensor_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of tensors created by ``fn`` and alive at the same time (results dropped)."""
    gc.collect()
    tracker = _Tracker()
    with tracker:
        fn()
    gc.collect()
    return tracker.peak
