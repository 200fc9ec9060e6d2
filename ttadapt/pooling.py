"""2-D max pooling for ttadapt's own no-graph passes, faster than PyTorch's CPU kernel.

The pass at the other state (AG-1/AG-2's forecast, AG-3's anchor, ``averaged_grad``'s
``other``) runs the model once more without a graph; its cost is ttadapt's overhead. On the CPU
PyTorch's max-pooling kernel for contiguous (NCHW) tensors is slow: 2.6 ms for Model B's first
pool (128 × 8 × 26 × 26, 2 × 2), 5.5 ms for resnet18's stem pool at 64 × 64 (16 × 64 × 32 × 32,
3 × 3, stride 2, padding 1), 18 ms for a 3 × 3 stride-1 pool of the same input. Here 2 × 2
windows with stride 2 in float32 run a fused kernel that visits each window in ATen's order with
its NaN rule (``kernels.max_pool2x2``: 0.18 ms for Model B's pool, ATen's bits exactly); other
windows and dtypes take the maximum of the kernel's k² strided views of the (−∞-padded) input,
one ``torch.maximum`` per view (2.5 and 1.3 ms for the two resnet-sized pools), the same values
(``tests/test_pooling.py`` compares them with ``torch.equal``; NaN propagates as in PyTorch's
kernel, which takes a NaN over any number; only the sign of a zero can differ where a window
holds both −0.0 and +0.0).

It applies to ``F.max_pool2d`` / ``torch.max_pool2d`` calls in a pass with no graph: CPU,
floating point, 3-D or 4-D contiguous input, no indices, ``ceil_mode=False``; everything else
(and everything with ``TTADAPT_FAST_POOLING=0`` in the environment) runs PyTorch's own call. The
pass at the graph state always runs the model's own call: its backward is the model's.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels

__all__ = ["ENABLED", "MAX_POOL2D_CALLS", "max_pool2d_by_maxima", "max_pool2d_call"]

#: whether :func:`max_pool2d_by_maxima` may stand in for PyTorch's call (``TTADAPT_FAST_POOLING``)
ENABLED = os.environ.get("TTADAPT_FAST_POOLING", "1").strip().lower() not in ("0", "false", "no", "off")

#: the callables a ``TorchFunctionMode`` sees for a 2-D max pooling without indices
MAX_POOL2D_CALLS = (F.max_pool2d, torch.max_pool2d)

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _pair(v: Any) -> tuple[int, int] | None:
    if isinstance(v, int) and not isinstance(v, bool):
        return v, v
    if isinstance(v, (tuple, list)) and len(v) in (1, 2) and all(isinstance(e, int) and not isinstance(e, bool) for e in v):
        return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])
    return None


def max_pool2d_by_maxima(input: Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
                         ceil_mode: bool = False, return_indices: bool = False) -> Tensor | None:
    """``F.max_pool2d(input, ...)`` as the maximum of strided views of ``input``; None where
    that does not apply (see the module docstring) — the caller then runs PyTorch's call."""
    if (not ENABLED or type(input) is not Tensor or input.device.type != "cpu" or input.dtype not in _FLOATS
            or input.dim() not in (3, 4) or return_indices or ceil_mode or not input.is_contiguous()
            or (input.requires_grad and torch.is_grad_enabled()) or torch._C._are_functorch_transforms_active()):
        return None  # (under torch.func transforms a tensor may have no memory of its own to hand to the kernel)
    k, s = _pair(kernel_size), _pair(kernel_size if stride in (None, [], ()) else stride)  # (torch.max_pool2d's default is [])
    p, d = _pair(padding), _pair(dilation)
    if k is None or s is None or p is None or d is None or min(*k, *s, *d) < 1 or min(p) < 0:
        return None
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        return None  # PyTorch refuses it: its own call raises the error
    h, w = input.shape[-2:]
    out_h = (h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    out_w = (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    if out_h < 1 or out_w < 1 or input.numel() == 0:
        return None
    if k == s == (2, 2) and p == (0, 0) and d == (1, 1):
        fused = kernels.max_pool2x2(input)  # float32: one pass, ATen's values bit for bit
        if fused is not None:
            return fused
    x = F.pad(input, (p[1], p[1], p[0], p[0]), value=float("-inf")) if p[0] or p[1] else input
    views = [x[..., i * d[0]:i * d[0] + s[0] * (out_h - 1) + 1:s[0], j * d[1]:j * d[1] + s[1] * (out_w - 1) + 1:s[1]]
             for i in range(k[0]) for j in range(k[1])]
    if len(views) == 1:
        return views[0].clone(memory_format=torch.contiguous_format)  # new memory, as PyTorch's call gives
    out = torch.maximum(views[0], views[1])
    for v in views[2:]:
        torch.maximum(out, v, out=out)
    return out.contiguous()  # (itself where it already is)


_SIGNATURE = inspect.signature(max_pool2d_by_maxima)


def max_pool2d_call(args: tuple, kwargs: dict) -> Tensor | None:
    """:func:`max_pool2d_by_maxima` for the arguments of one of :data:`MAX_POOL2D_CALLS` as a
    ``TorchFunctionMode`` received them; None where it does not apply or they do not bind."""
    try:
        bound = _SIGNATURE.bind(*args, **kwargs)
    except TypeError:
        return None
    return max_pool2d_by_maxima(*bound.args, **bound.kwargs)
