"""Autograd functions for a graph that is differentiated twice (forward-looking AG-1 / AG-2).

AG-1 and AG-2 need the ordinary gradient at θ first (to forecast θ′ with the base optimizer) and
then the averaged gradient between θ and θ′ at the same graph state θ. Rather than run the
forward at θ twice, the sites of that one forward are built with these functions: each keeps its
graph-state input and a :class:`DeferredSlot`. While the slot is empty the backward is the
ordinary one; once the pass at θ′ has filled the slot with that pass's input (and weight), the
next backward through the retained graph uses the secant slope (Eq. 8) or the mean weight and
input (Eq. 11). The cost is then the spec's 2·T_fwd + 2·T_bwd.

For AG-2 Linear a slot also carries, from the ordinary backward, the L2 norms of the affine
layer's input and parameter gradients, to which the averaged ones are rescaled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from torch.autograd import Function

from . import kernels
from .activations import _prelu_weight
from .rare import _fill_exact_ties
from .secant import _affine_grads, _compute_dtype, _fused_clamp_secant, _prelu_slopes, secant_slope

__all__ = ["DeferredSlot", "DeferredActivation", "DeferredPReLU", "DeferredModule", "DeferredPassThrough", "DeferredAffine"]


@dataclass
class DeferredSlot:
    """One site of the graph pass, waiting for the other state's input."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    ub: Tensor | None = None  # the input at the other state, once known
    fb: Tensor | None = None  # the output there, when that pass kept it
    weight: Tensor | None = None  # PReLU slope / affine weight at the other state
    rescale: bool = False  # AG-2 Linear: rescale averaged gradients to the ordinary norms
    norms: tuple[Tensor | None, Tensor | None] | None = None  # ordinary ‖g_input‖, ‖g_params‖

    @property
    def filled(self) -> bool:
        return self.ub is not None


def activation_slope(fn: Callable, derivative: Callable, ua: Tensor, fa: Tensor, ub: Tensor, exact: tuple[float, float] | bool,
                     closed_form: Callable | None, fb: Tensor | None = None) -> Tensor:
    """The secant slope of one activation between ``ua`` (with ``fa = f(ua)``) and ``ub`` (with
    ``fb = f(ub)`` when known). Neither ``ub`` nor ``fb`` is overwritten."""
    if closed_form is not None and _compute_dtype(ua.dtype) == ua.dtype:
        return closed_form(ua, fa, ub, fb)
    if exact and _compute_dtype(ua.dtype) == ua.dtype:
        fused = _fused_clamp_secant(exact, ua, ub)
        if fused is not None:
            return fused
        diff = ub - ua
        slope = (fn(ub).sub_(fa) if fb is None else fb - fa).div_(diff)
        return _fill_exact_ties(slope, ua, derivative)
    return secant_slope(fn, derivative, ua, fa, ub, fb=fb)


def _save_output(ctx: Any, y: Tensor) -> None:
    """Keep ``f(ua)`` for the averaged backward outside autograd's saved-tensor checks: the model
    may modify the activation's output in place afterwards (as plain autograd allows for
    activations that save their input); :func:`_output` then recomputes it."""
    ctx.y, ctx.y_version = y.detach(), y._version


def _output(ctx: Any, fn: Callable, ua: Tensor) -> Tensor:
    y = ctx.y
    return y if y._version == ctx.y_version else fn(ua)


class DeferredActivation(Function):
    """``y = call(u)``; backward ``g ⊙ f'(u)`` until the slot is filled, then ``g ⊙`` secant."""

    @staticmethod
    def forward(ctx: Any, u: Tensor, call: Callable, fn: Callable, derivative: Callable, inplace: bool, exact: tuple[float, float] | bool,
                closed_form: Callable | None, slot: DeferredSlot, vjp: Callable | None = None) -> Tensor:  # type: ignore[override]
        ua = u.detach().clone() if inplace else u  # an in-place call would overwrite the input
        y = call(u)
        if inplace:
            ctx.mark_dirty(u)
        ctx.save_for_backward(ua)
        _save_output(ctx, y)
        ctx.fns = (fn, derivative, exact, closed_form, vjp)
        ctx.slot = slot
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        (ua,) = ctx.saved_tensors
        fn, derivative, exact, closed_form, vjp = ctx.fns
        slot = ctx.slot
        none = (None,) * 8
        if not slot.filled:  # the ordinary backward
            if vjp is not None and grad.dtype == ua.dtype:
                return (vjp(grad, ua, _output(ctx, fn, ua)),) + none
            return (grad * derivative(ua).to(grad.dtype),) + none
        if isinstance(exact, tuple) and grad.dtype == ua.dtype:  # a clamp: g ⊙ secant in one fused CPU pass
            fused = kernels.clamp_secant(ua, slot.ub, *exact, grad=grad)
            if fused is not None:
                return (fused,) + none
        slope = activation_slope(fn, derivative, ua, _output(ctx, fn, ua), slot.ub, exact, closed_form, slot.fb)
        return (grad * slope,) + none


def _prelu_weight_grad(gw: Tensor, weight_shape: torch.Size, weight_numel: int) -> Tensor:
    if weight_numel == 1:
        return gw.sum().reshape(weight_shape)
    if gw.dim() >= 2:
        gw = gw.sum(dim=[0] + list(range(2, gw.dim())))
    return gw.reshape(weight_shape)


class DeferredPReLU(Function):
    """``torch.prelu(u, w)``; ordinary gradients, then both averaged towards the slot's state."""

    @staticmethod
    def forward(ctx: Any, u: Tensor, weight: Tensor, slot: DeferredSlot) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(u, weight)
        ctx.slot = slot
        return torch.prelu(u, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        u, weight = ctx.saved_tensors
        slot = ctx.slot
        if slot.filled:
            s_u, s_w = _prelu_slopes(u, slot.ub, weight, slot.weight)
        else:
            s_u = torch.where(u > 0, torch.ones_like(u), _prelu_weight(weight, u).expand_as(u))
            s_w = u.clamp(max=0)
        return grad * s_u, _prelu_weight_grad(grad * s_w, weight.shape, weight.numel()), None


class DeferredModule(Function):
    """A whole activation-module call as one deferred site."""

    @staticmethod
    def forward(ctx: Any, u: Tensor, forward: Callable, derivative: Callable, slot: DeferredSlot) -> Tensor:  # type: ignore[override]
        y = forward(u)
        ctx.save_for_backward(u)
        _save_output(ctx, y)
        ctx.fns = (forward, derivative)
        ctx.slot = slot
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        (u,) = ctx.saved_tensors
        forward, derivative = ctx.fns
        if not ctx.slot.filled:
            return grad * derivative(u), None, None, None
        y = _output(ctx, forward, u)
        return grad * secant_slope(forward, derivative, u, y, ctx.slot.ub, fb=ctx.slot.fb), None, None, None


class DeferredPassThrough(Function):
    """Forward ``y`` (computed with its own graph to the module's parameters); ``u`` receives
    ``g ⊙ f'(u)``, then ``g ⊙`` secant once the slot is filled."""

    @staticmethod
    def forward(ctx: Any, u: Tensor, y: Tensor, forward: Callable, derivative: Callable, slot: DeferredSlot) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(u)
        _save_output(ctx, y)
        ctx.fns = (forward, derivative)
        ctx.slot = slot
        return y.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        (u,) = ctx.saved_tensors
        forward, derivative = ctx.fns
        with torch.no_grad():
            if ctx.slot.filled:
                slope = secant_slope(forward, derivative, u, _output(ctx, forward, u), ctx.slot.ub, fb=ctx.slot.fb)
            else:
                slope = derivative(u)
        return grad * slope, grad, None, None, None


def _norm(*tensors: Tensor | None) -> Tensor | None:
    """Joint L2 norm (a 0-d float64 tensor: no host synchronisation). Each tensor's norm is one
    read-only pass in its own precision (no float64 copy of a gradient); they combine in float64."""
    present = [t.detach() for t in tensors if t is not None]
    if not present:
        return None
    return torch.sqrt(sum(_vector_norm(t).double().square() for t in present))


def _vector_norm(t: Tensor) -> Tensor:
    # half-precision norms overflow beyond 65504: those are taken in float32
    return torch.linalg.vector_norm(t, dtype=torch.float32 if t.element_size() < 4 and t.is_floating_point() else None)


def _rescale(target: Tensor | None, *tensors: Tensor | None) -> None:
    """Scale ``tensors`` jointly (in place) to the L2 norm ``target``; all-zero ones stay zero."""
    now = _norm(*tensors)
    if target is None or now is None:
        return
    factor = torch.where(now > 0, target / now, torch.ones_like(now))
    for t in tensors:
        if t is not None:
            t.mul_(factor.to(t.dtype))


class DeferredAffine(Function):
    """Linear / Conv{1,2,3}d: ordinary backward, then Eq. 11 with the slot's weight and input
    (and, for AG-2 Linear, the averaged gradients rescaled to the ordinary norms)."""

    @staticmethod
    def forward(ctx: Any, u: Tensor, weight: Tensor, bias: Tensor | None, kind: str, conv_args: tuple,
                slot: DeferredSlot) -> Tensor:  # type: ignore[override]
        if kind == "linear":
            y = torch.nn.functional.linear(u, weight, bias)
        else:
            from .secant import _CONV

            y = _CONV[kind](u, weight, bias, *conv_args)
        ctx.save_for_backward(u, weight)
        ctx.kind, ctx.conv_args, ctx.has_bias, ctx.slot = kind, conv_args, bias is not None, slot
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        u, weight = ctx.saved_tensors
        slot = ctx.slot
        needs = tuple(ctx.needs_input_grad[:3])
        if not slot.filled:
            gu, gw, gb = _affine_grads(ctx.kind, ctx.conv_args, ctx.has_bias, needs, grad, u, weight)
            if slot.rescale:
                slot.norms = (_norm(gu), _norm(gw, gb))
            return gu, gw, gb, None, None, None
        u_mean = torch.add(u, slot.ub).mul_(0.5) if needs[1] else u
        w_mean = torch.add(weight, slot.weight).mul_(0.5) if needs[0] else weight
        gu, gw, gb = _affine_grads(ctx.kind, ctx.conv_args, ctx.has_bias, needs, grad, u_mean, w_mean)
        if slot.rescale and slot.norms is not None:
            _rescale(slot.norms[0], gu)
            _rescale(slot.norms[1], gw, gb)
        return gu, gw, gb, None, None, None
