"""Autograd functions for a graph that is differentiated twice (forward-looking AG-1 / AG-2).

AG-1 and AG-2 need the ordinary gradient at θ first (to forecast θ′ with the base optimizer) and
then the averaged gradient between θ and θ′ at the same graph state θ. Rather than run the
forward at θ twice, the sites of that one forward are built with these functions: each keeps its
graph-state input and a :class:`DeferredSlot`. While the slot is empty the backward is the
ordinary one; once the pass at θ′ has filled the slot with that pass's input (and weight), the
next backward through the retained graph uses the secant slope (Eq. 8) or the mean weight and
input (Eq. 11). The cost is then the spec's 2·T_fwd + 2·T_bwd.

An activation whose call is one native ATen op (``torch.tanh``, ``F.relu``, ``F.elu``, ...) is
not wrapped at all: the op builds its own autograd node, so the forward and the ordinary
backward run at PyTorch's speed with no Python per site, and :func:`hook_native_site` hooks that
node once the slot is filled, replacing the gradient it passes on by ``g ⊙`` secant
(:func:`native_site` keeps what the hook needs). On a model of many small sites, such as the
paper's Model B, the Python of an autograd ``Function`` per site cost more than the arithmetic.
Sites above :data:`ttadapt.secant.PRODUCT_MAX` elements that are not in place run
:class:`DeferredActivation` instead: the hooked node would first repeat its ordinary backward,
a full pass over the site, before the hook replaces the result.

For AG-2 Linear a slot also carries, from the ordinary backward, the L2 norms of the affine
layer's input and parameter gradients, to which the averaged ones are rescaled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from torch.autograd import Function

from .activations import _prelu_weight
from .rare import _fill_exact_ties
from .secant import _affine_grads, _compute_dtype, _fused_clamp_secant, _prelu_slopes, secant_slope

__all__ = ["DeferredSlot", "NativeSite", "native_site", "single_node_call", "hook_native_site", "DeferredActivation", "DeferredPReLU", "DeferredModule", "DeferredPassThrough", "DeferredAffine", "joint_norm", "rescale_to"]


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
    native: "NativeSite | None" = None  # a native op's site (see native_site)

    @property
    def filled(self) -> bool:
        return self.ub is not None

    def take_other(self) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(ub, fb, weight)`` for the averaged backward, let go of here: the graph holds the slot
        until the loss dies, and the kept tensors must not live that long (the peak memory of
        the averaged backward would hold every site's)."""
        assert self.ub is not None
        taken = (self.ub, self.fb, self.weight)
        self.ub = self.fb = self.weight = None
        return taken


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


def secant_grad(grad: Tensor, ua: Tensor, fa: Tensor | None, ub: Tensor, fb: Tensor | None, fns: tuple,
                out: Tensor | None = None) -> Tensor:
    """``grad ⊙`` secant slope of one activation site between ``ua`` and ``ub`` — the averaged
    backward of a deferred site. ``fns``: ``(fn, derivative, exact, closed_form, grad_secant)``;
    ``fa`` / ``fb``: ``f(ua)`` / ``f(ub)`` where at hand, else None; ``out``: memory the result
    may go to. One fused CPU pass where ``grad_secant`` applies, else the slope, then a product."""
    fn, derivative, exact, closed_form, grad_secant = fns
    if grad_secant is not None and grad.dtype == ua.dtype:
        fused = grad_secant(grad, ua, fa, ub, fb, out)
        if fused is not None:
            return fused
    slope = activation_slope(fn, derivative, ua, fn(ua) if fa is None else fa, ub, exact, closed_form, fb)
    if out is None or slope.dtype != grad.dtype:
        return grad * slope
    return torch.mul(grad, slope, out=out)


@dataclass
class NativeSite:
    """What :func:`hook_native_site` needs of one native activation call of the graph pass."""

    ua: Tensor  # the input at the graph state (detached; a copy for an in-place call)
    y: Tensor  # the output (detached), valid while its version is `y_version`
    y_version: int
    node: Any  # the call's autograd node, until it is hooked
    fns: tuple  # (fn, derivative, exact, closed_form, grad_secant)


# (func, in place, dtype, device type) -> whether one call makes exactly one autograd node whose
# only input is the activation's input (see single_node_call)
_SINGLE_NODE: dict[tuple, bool] = {}


def _substituted(args: tuple, kwargs: dict, u: Tensor, new: Tensor) -> tuple[tuple, dict]:
    return tuple(new if a is u else a for a in args), {k: (new if v is u else v) for k, v in kwargs.items()}


def single_node_call(func: Callable, args: tuple, kwargs: dict, u: Tensor, inplace: bool) -> bool:
    """Whether calling ``func`` on ``u`` makes one autograd node with ``u`` as its only input — a
    native ATen op (``torch.tanh``, ``F.relu``), not a composite (``F.softsign``, which builds
    several) — found once per function, in-place flag, dtype and device by a call on a
    one-element stand-in for ``u``."""
    key = (func, inplace, u.dtype, u.device.type)
    try:
        known = _SINGLE_NODE.get(key)
    except TypeError:  # an unhashable callable
        return False
    if known is None:
        base = torch.zeros((1,) * max(u.dim(), 1), dtype=u.dtype, device=u.device, requires_grad=True)
        with torch.enable_grad():
            probe = base * 1
            before = probe.grad_fn
            p_args, p_kwargs = _substituted(args, kwargs, u, probe)
            try:
                out = func(*p_args, **p_kwargs)
            except Exception:  # noqa: BLE001 — whatever the stand-in does not support: not native
                out = None
        node = out.grad_fn if isinstance(out, Tensor) else None
        known = _SINGLE_NODE[key] = node is not None and node.next_functions == ((before, 0),)
    return known


def native_site(call: Callable[[], Tensor], u: Tensor, inplace: bool, fns: tuple, slot: DeferredSlot) -> Tensor:
    """Run a native activation call (see :func:`single_node_call`) as it is, keeping its input,
    output and autograd node in ``slot`` for :func:`hook_native_site`."""
    before, index = u.grad_fn, u.output_nr
    ua = u.detach().clone() if inplace else u.detach()  # an in-place call would overwrite the input
    y = call()
    node = y.grad_fn
    if node is None or node.next_functions != ((before, index),):
        raise RuntimeError(f"ttadapt: the call of {slot.name} did not build the one autograd node it built on a stand-in input")
    slot.native = NativeSite(ua, y.detach(), y._version, node, fns)
    return y


def hook_native_site(slot: DeferredSlot) -> None:
    """Once ``slot`` holds the other state's input: make the native node of its site pass on
    ``g ⊙`` secant instead of ``g ⊙ f'(u)`` (the node still runs its own backward first).

    The hook holds the slot, the slot no longer the node: no reference cycle through the graph.
    """
    site = slot.native
    assert site is not None and site.node is not None
    node, site.node = site.node, None

    def secant_hook(grad_inputs: tuple, grad_outputs: tuple):
        grad = grad_outputs[0]
        if grad is None or grad_inputs[0] is None:
            return None
        ua, ub, fb, y = site.ua, slot.ub, slot.fb, site.y
        # the graph holds this hook until it dies: let go of the tensors once they are used
        site.ua = site.y = slot.ub = slot.fb = None
        # the node's own result (g ⊙ f'(u), new memory no one else holds) receives g ⊙ secant:
        # the site's averaged backward allocates no more than the ordinary one
        out = grad_inputs[0]
        if not (out.shape == grad.shape and out.dtype == grad.dtype and out.is_contiguous() and grad.is_contiguous()
                and out.data_ptr() != grad.data_ptr()):
            out = None
        fa = y if y._version == site.y_version else None
        return (secant_grad(grad, ua, fa, ub, fb, site.fns, out),)

    node.register_hook(secant_hook)


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
                closed_form: Callable | None, slot: DeferredSlot, vjp: Callable | None = None,
                grad_secant: Callable | None = None) -> Tensor:  # type: ignore[override]
        ua = u.detach().clone() if inplace else u  # an in-place call would overwrite the input
        y = call(u)
        if inplace:
            ctx.mark_dirty(u)
        ctx.save_for_backward(ua)
        _save_output(ctx, y)
        ctx.fns = (fn, derivative, exact, closed_form, vjp, grad_secant)
        ctx.slot = slot
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        (ua,) = ctx.saved_tensors
        fn, derivative, exact, closed_form, vjp, grad_secant = ctx.fns
        slot = ctx.slot
        none = (None,) * 9
        if not slot.filled:  # the ordinary backward
            if vjp is not None and grad.dtype == ua.dtype:
                return (vjp(grad, ua, _output(ctx, fn, ua)),) + none
            return (grad * derivative(ua).to(grad.dtype),) + none
        y = ctx.y if ctx.y._version == ctx.y_version else None
        ctx.y = None
        ub, fb, _ = slot.take_other()
        return (secant_grad(grad, ua, y, ub, fb, (fn, derivative, exact, closed_form, grad_secant)),) + none


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
            ub, _, wb = slot.take_other()
            s_u, s_w = _prelu_slopes(u, ub, weight, wb)
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
        ctx.y = None
        ub, fb, _ = ctx.slot.take_other()
        return grad * secant_slope(forward, derivative, u, y, ub, fb=fb), None, None, None


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
                y = _output(ctx, forward, u)
                ctx.y = None
                ub, fb, _ = ctx.slot.take_other()
                slope = secant_slope(forward, derivative, u, y, ub, fb=fb)
            else:
                slope = derivative(u)
        return grad * slope, grad, None, None, None


def joint_norm(*tensors: Tensor | None) -> Tensor | None:
    """Joint L2 norm (a 0-d float64 tensor: no host synchronisation). Each tensor's norm is one
    read-only pass in its own precision (no float64 copy of a gradient); they combine in float64."""
    present = [t.detach() for t in tensors if t is not None]
    if not present:
        return None
    return torch.sqrt(sum(_vector_norm(t).double().square() for t in present))


def _vector_norm(t: Tensor) -> Tensor:
    # half-precision norms overflow beyond 65504: those are taken in float32
    return torch.linalg.vector_norm(t, dtype=torch.float32 if t.element_size() < 4 and t.is_floating_point() else None)


def rescale_to(target: Tensor | None, *tensors: Tensor | None) -> None:
    """Scale ``tensors`` jointly (in place) to the L2 norm ``target``; all-zero ones stay zero."""
    now = joint_norm(*tensors)
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
                slot.norms = (joint_norm(gu), joint_norm(gw, gb))
            return gu, gw, gb, None, None, None
        ub, _, wb = slot.take_other()
        u_mean = torch.add(u, ub).mul_(0.5) if needs[1] else u
        w_mean = torch.add(weight, wb).mul_(0.5) if needs[0] else weight
        gu, gw, gb = _affine_grads(ctx.kind, ctx.conv_args, ctx.has_bias, needs, grad, u_mean, w_mean)
        if slot.rescale and slot.norms is not None:
            rescale_to(slot.norms[0], gu)
            rescale_to(slot.norms[1], gw, gb)
        return gu, gw, gb, None, None, None
