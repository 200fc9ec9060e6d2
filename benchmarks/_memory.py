"""Peak bytes of tensors alive during a call, on any device (the CPU has no allocator stats).

A TorchDispatchMode sees every tensor an operator creates — forward, backward and the engine's
own — and a finalizer sees it die; a storage is counted once, however many views it has, and
views or in-place results of storages that existed before the call (parameters, the batch) are
not counted.
"""

from __future__ import annotations

import gc
import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _Tracker(TorchDispatchMode):
    """Counts each storage once, from its first tensor until its last tensor dies.

    Views are found by their storage, not by ``Tensor._base`` (which the dispatch level does not
    see): a storage stays counted while any tensor on it is alive.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self.tensors: set[int] = set()
        self.refs: dict[int, int] = {}  # storage data_ptr -> live tensors on it
        self.sizes: dict[int, int] = {}

    def _release(self, tensor_id: int, key: int) -> None:
        self.tensors.discard(tensor_id)
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.current -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Outputs the schema marks as aliases (views, in-place results) allocate nothing.
        aliases = any(r.alias_info is not None for r in func._schema.returns)
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or id(t) in self.tensors:
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or (aliases and key not in self.refs):
                continue
            self.tensors.add(id(t))
            if key not in self.refs:
                self.refs[key] = 0
                self.sizes[key] = nbytes
                self.current += nbytes
                self.peak = max(self.peak, self.current)
            self.refs[key] += 1
            weakref.finalize(t, self._release, id(t), key)
        return out


def peak_tensor_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of tensors created by ``fn`` and alive at the same time (results dropped)."""
    gc.collect()
    tracker = _Tracker()
    with tracker:
        fn()
    gc.collect()
    return tracker.peak
