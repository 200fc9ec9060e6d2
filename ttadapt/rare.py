"""Replacing the few elements of a slope tensor where the secant is undefined, and running
elementwise secant arithmetic a block at a time.

Where the two states' inputs agree exactly (0/0) or nearly (cancellation), the averaged
derivative is the ordinary one. Such elements are usually absent or few, and on the CPU a
boolean mask over a whole tensor costs several arithmetic passes, so they are located by
read-only reductions and patched row by row (see :func:`_fill_rare`). :func:`_by_blocks` keeps
the temporaries of a multi-pass elementwise computation block-sized.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

_BLOCK = 1 << 18
_ROW = 1024  # elements per row when rare elements are located by one reduction per row
_SMALL = 1 << 14  # up to this many elements, one reduction over the whole tensor (fewer calls)


def _flat(t: Tensor, like: Tensor) -> Tensor | None:
    """``t`` as a 1-D view in memory order, when it has ``like``'s shape and strides and its
    elements fill a block of memory (contiguous, channels-last, any permutation)."""
    if t.shape != like.shape or t.stride() != like.stride():
        return None
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda p: p[1]):
        if size != 1:
            if stride != expected:
                return None
            expected *= size
    return t.as_strided((t.numel(),), (1,))


def _fill_rare(slope: Tensor, key: Tensor, at: Tensor, derivative: Callable[[Tensor], Tensor], rare: str,
               tol: float = 0.0) -> Tensor:
    """``derivative(at)`` in place of ``slope`` where ``key`` flags it (``derivative`` is
    elementwise): ``rare="nan"``, where ``key`` (the slope itself) is NaN — exact ties of a
    slopes-0-or-1 activation; ``rare="close"``, where ``key`` (the gap of :func:`_close_gap`)
    is ``≤ tol``.

    On the CPU such elements are usually absent or few, and a boolean mask over a whole tensor
    costs several arithmetic passes here (``nonzero`` several more). Ties are looked for by one
    sum over the whole tensor first (finite: none). Then one read-only reduction
    per row of ``_ROW`` elements (a sum: finite unless the row holds a NaN or an infinity; a
    minimum of the gap) finds the rows to look at, and the test, the derivative and the
    replacement run on those rows only. When many rows are flagged, ``where`` runs over the
    whole tensor, a block at a time (temporaries stay small: the extra memory of the averaged
    gradient is the kept inputs). Up to ``_SMALL`` elements, and for tensors that do not fill a
    block of memory: one reduction, and one ``where`` if it flags anything. On accelerators (no
    host synchronisation): one ``where``.
    """
    if rare == "nan":
        test: Callable[[Tensor], Tensor] = torch.isnan
        reduce: Callable[..., Tensor] = torch.sum
        hit: Callable[[Tensor], Tensor] = lambda r: ~torch.isfinite(r)  # noqa: E731
        flagged: Callable[[float], bool] = lambda v: not math.isfinite(v)  # noqa: E731
    else:
        test = hit = lambda t: t <= tol  # noqa: E731
        reduce = torch.amin
        flagged = lambda v: v <= tol  # noqa: E731
    dtype = slope.dtype

    def replace(s: Tensor, k: Tensor, a: Tensor, out: Tensor | None = None) -> Tensor:
        return torch.where(test(k), derivative(a).to(dtype), s, out=out)

    n = slope.numel()
    if n == 0:
        return slope
    if slope.device.type != "cpu":
        return replace(slope, key, at)
    if rare == "nan" and not flagged(float(key.sum())):
        return slope  # no tie anywhere (the common case): one pass, one scalar
    flat_s = _flat(slope, slope) if n > _SMALL else None
    flat_k, flat_a = (None, None) if flat_s is None else (_flat(key, slope), _flat(at, slope))
    if flat_s is None or flat_k is None or flat_a is None:  # small, or not a block of memory
        return replace(slope, key, at) if rare == "nan" or flagged(float(key.amin())) else slope
    m = n // _ROW
    body = m * _ROW
    stats = reduce(flat_k[:body].view(m, _ROW), 1)
    if body < n:
        stats = torch.cat((stats, reduce(flat_k[body:]).view(1)))
    rows = hit(stats).nonzero().squeeze(1)
    if rows.numel() == 0:
        return slope
    if rows.numel() * 8 > stats.numel():
        _by_blocks(lambda s, k, a: replace(s, k, a, out=s), flat_s, flat_k, flat_a)
        return slope
    if body < n and int(rows[-1]) == m:  # the tail (rows ascend)
        rows = rows[:-1]
        replace(flat_s[body:], flat_k[body:], flat_a[body:], out=flat_s[body:])
    s_rows, k_rows, a_rows = (t[:body].view(m, _ROW) for t in (flat_s, flat_k, flat_a))
    for idx in rows.split(_BLOCK // _ROW):
        s_rows[idx] = replace(s_rows[idx], k_rows[idx], a_rows[idx])
    return slope


def _fill_at(slope: Tensor, at: Tensor, positions: Tensor, values: Callable[[Tensor], Tensor]) -> None:
    """``slope`` ← ``values(at)`` at ``positions`` (int64, in memory order: a kernel reported them
    for ``slope`` and ``at``, which it found laid out alike), ``values`` evaluated on those
    elements alone."""
    if at.is_contiguous():
        flat_slope, flat_at = slope.view(-1), at.view(-1)
    else:
        flat_slope, flat_at = _flat(slope, slope), _flat(at, slope)
    flat_slope.index_copy_(0, positions, values(flat_at.index_select(0, positions)).to(slope.dtype))


def _writable_out(ub: Tensor, owned: bool, fb: Tensor | None, fb_owned: bool) -> Tensor | None:
    """Where a secant slope may be written instead of new memory: ``fb`` (the kept ``f(ub)``)
    or else ``ub`` when the engine alone holds them, or None."""
    return fb if fb_owned and fb is not None else ub if owned else None


def _fill_exact_ties(slope: Tensor, at: Tensor, derivative: Callable[[Tensor], Tensor]) -> Tensor:
    """``derivative(at)`` where ``slope`` is NaN: for quotients that are 0/0 exactly where the
    inputs agree and finite elsewhere (unless an input is not).

    Slopes-0-or-1 activations: there ``f(ub) − f(ua) = 0 = ub − ua``, and nowhere else can the
    quotient be NaN or infinite (``|f(ub) − f(ua)| ≤ |ub − ua|``). The closed-form secants of
    :mod:`ttadapt.activations` whose numerator vanishes with ``ub − ua`` likewise.
    """
    return _fill_rare(slope, slope, at, derivative, "nan")


def _by_blocks(step: Callable[..., None], out: Tensor, *tensors: Tensor, block: int = _BLOCK) -> Tensor:
    """``step(out, *tensors)`` for an elementwise ``step`` that writes ``out``, run ``block``
    elements at a time (1-D memory-order views) so that the temporaries it allocates
    stay block-sized: the extra memory of the averaged gradient is the kept inputs, not a few
    full-size intermediates per site. One call for small tensors and for tensors not laid out
    like ``out``."""
    n = out.numel()
    if n <= block:
        step(out, *tensors)
        return out
    flats = [_flat(t, out) for t in (out, *tensors)]
    if any(f is None for f in flats):
        step(out, *tensors)
        return out
    for start in range(0, n, block):
        step(*(f[start:start + block] for f in flats))
    return out
