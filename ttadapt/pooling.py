"""2-D max pooling for ttadapt's own passes, faster than PyTorch's CPU kernel.

The pass at the other state (AG-1/AG-2's forecast, AG-3's anchor, ``averaged_grad``'s
``other``) runs the model once more without a graph; its cost is ttadapt's overhead. On the CPU
PyTorch's max-pooling kernel for contiguous (NCHW) tensors is slow: 2.6 ms for Model B's first
pool (128 × 8 × 26 × 26, 2 × 2), 5.5–6 ms for resnet18's stem pool at 64 × 64 (16 × 64 × 32 × 32,
3 × 3, stride 2, padding 1), 18 ms for a 3 × 3 stride-1 pool of the same input. Here float32
input runs fused kernels that pick, in each window, the element ATen's kernel picks, by its
order and NaN rule (``kernels.max_pool2d``: 2 × 2 windows with stride 2 in one pass, 0.18 ms
for Model B's pool; any other window by each row's maxima, then the rows', 0.6 ms for resnet18's
stem pool, 0.9 ms with indices): ATen's bits exactly. Other dtypes take the maximum of the
kernel's k² strided views of the (−∞-padded) input, one ``torch.maximum`` per view (2.5 and
1.3 ms for the two resnet-sized pools), the same values (``tests/test_pooling.py`` compares them
with ``torch.equal``; NaN propagates as in PyTorch's kernel, which takes a NaN over any number;
only the sign of a zero can differ where a window holds both −0.0 and +0.0).

The passes that build a graph (at the current parameters: ``averaged_grad``'s and AG-3's, AG-1's
and AG-2's) pool float32 by the same kernels, which also give ATen's indices (the first maximum
of a window, its last NaN), under :class:`MaxPool2d`: its backward is PyTorch's own
(``max_pool2d_with_indices_backward`` with those indices), so the gradient is the ordinary one
bit for bit, and it saves what PyTorch's node saves (the input and the indices). Other dtypes in
those passes run PyTorch's call (strided maxima give no indices), as does a dilated window that
misses the input altogether.

It applies to ``F.max_pool2d`` / ``torch.max_pool2d`` calls on the CPU with floating-point, 3-D
or 4-D contiguous input, no indices requested, ``ceil_mode=False``; everything else (and
everything with ``TTADAPT_FAST_POOLING=0`` in the environment) runs PyTorch's own call. Plain
training outside ttadapt's passes is not touched: a step's cost against the plain step's
includes this speed-up, which ``TTADAPT_FAST_POOLING=0`` takes out.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from . import kernels
from .switches import switched_on

__all__ = ["ENABLED", "MAX_POOL2D_CALLS", "MaxPool2d", "max_pool2d_by_maxima", "max_pool2d_call"]

#: whether :func:`max_pool2d_by_maxima` may stand in for PyTorch's call (``TTADAPT_FAST_POOLING``)
ENABLED = switched_on("TTADAPT_FAST_POOLING")

#: the callables a ``TorchFunctionMode`` sees for a 2-D max pooling without indices
MAX_POOL2D_CALLS = (F.max_pool2d, torch.max_pool2d)

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _pair(v: Any) -> tuple[int, int] | None:
    if isinstance(v, int) and not isinstance(v, bool):
        return v, v
    if isinstance(v, (tuple, list)) and len(v) in (1, 2) and all(isinstance(e, int) and not isinstance(e, bool) for e in v):
        return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])
    return None


class MaxPool2d(Function):
    """``F.max_pool2d(u, *window)`` of a contiguous float32 CPU tensor by the fused kernels
    (``window``: kernel, stride, padding, dilation, each a pair), with PyTorch's own backward
    (``max_pool2d_with_indices_backward``) from the kernels' indices, which are ATen's: the output
    and the gradient are the ordinary ones bit for bit. ``forward`` is handed the kernels'
    ``(values, indices)`` in a tuple (not as tensor arguments: autograd would make the output a
    view of an input, which an in-place operation after the pooling could not modify)."""

    @staticmethod
    def forward(ctx: Any, u: Tensor, pooled: tuple[Tensor, Tensor], window: tuple) -> Tensor:  # type: ignore[override]
        out, indices = pooled
        ctx.save_for_backward(u, indices)  # what PyTorch's own node saves
        ctx.window = window
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        u, indices = ctx.saved_tensors
        k, s, p, d = ([*pair] for pair in ctx.window)
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, u, k, s, p, d, False, indices), None, None


def max_pool2d_by_maxima(input: Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
                         ceil_mode: bool = False, return_indices: bool = False) -> Tensor | None:
    """``F.max_pool2d(input, ...)`` by faster code (see the module docstring): the fused kernels
    (float32) or strided maxima without a graph, :class:`MaxPool2d` where the call builds one;
    None where that does not apply — the caller then runs PyTorch's call."""
    if (not ENABLED or type(input) is not Tensor or input.device.type != "cpu" or input.dtype not in _FLOATS
            or input.dim() not in (3, 4) or return_indices or ceil_mode or not input.is_contiguous()
            or torch._C._are_functorch_transforms_active()):
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
    window = (k, s, p, d)
    if input.requires_grad and torch.is_grad_enabled():  # a graph: PyTorch's backward from the kernel's indices
        if input.dtype is torch.float32 and (got := kernels.max_pool2d(input.detach(), *window, indices=True)) is not None:
            return MaxPool2d.apply(input, got, window)
        return None
    if input.dtype is torch.float32 and (out := kernels.max_pool2d(input, *window)) is not None:
        return out  # one pass, ATen's values bit for bit
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
