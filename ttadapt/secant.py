"""Autograd functions of the averaged backward pass (spec §2, paper Eq. 8 and 11).

Each function computes the ordinary forward at the graph state and replaces one local
derivative in the backward:

* :func:`secant_product` / :class:`SecantActivation` — ``f'(u)`` becomes the secant slope
  between the two states (the first: a native ``MulBackward0`` carries it, no Python in the
  backward; the second, an autograd function, for in-place calls);
* :class:`SecantPReLU` — the same for PReLU, with its slope parameter's gradient averaged too;
* :class:`AveragedAffine` — Linear/Conv backward through the mean weight and the mean input.

The secant is computed once, in the forward, and saved in place of what the ordinary backward
would save, so the averaged backward keeps the memory of the ordinary one.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.autograd import Function

from . import kernels
from .activations import Activation, _prelu_weight
from .rare import _by_blocks, _fill_at, _fill_exact_ties, _fill_rare, _writable_out


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision secants are formed in float32: their differences cancel badly otherwise."""
    cdtype = _COMPUTE_DTYPES.get(dtype)
    if cdtype is None:
        cdtype = _COMPUTE_DTYPES[dtype] = torch.promote_types(dtype, torch.float32)
    return cdtype


_COMPUTE_DTYPES: dict[torch.dtype, torch.dtype] = {}


def _close_tol(dtype: torch.dtype) -> float:
    """The division-by-zero rule's tolerance, ``sqrt(eps)`` (see :func:`_close_gap`)."""
    return torch.finfo(dtype).eps ** 0.5


def _close_gap(ua: Tensor, diff: Tensor, overwrite: bool = False) -> tuple[Tensor, float]:
    """``(gap, tol)`` with ``gap = |ub − ua| − tol·|ua|``: the inputs are too close for a secant
    (the paper's division-by-zero rule) where ``gap ≤ tol``, i.e. ``|ub − ua| ≤ tol·(1 + |ua|)``,
    ``tol = sqrt(eps)``.

    That threshold balances the cancellation error of the secant, ~eps·|f|/|Δu|, against the
    error of using the derivative instead, ~|f''|·|Δu|. ``overwrite`` lets ``gap`` reuse
    ``diff``'s memory (the caller no longer needs it).
    """
    tol = _close_tol(ua.dtype)
    gap = diff.abs_() if overwrite else diff.abs()
    # in blocks, so that |ua| never needs a full-size temporary
    _by_blocks(lambda g, u: g.sub_(u.abs(), alpha=tol), gap, ua)
    return gap, tol


def close_mask(ua: Tensor, diff: Tensor, overwrite: bool = False) -> Tensor:
    """Where the two inputs are too close for a secant (see :func:`_close_gap`)."""
    gap, tol = _close_gap(ua, diff, overwrite)
    return gap <= tol


def secant_slope(
    fn: Callable[[Tensor], Tensor],
    derivative: Callable[[Tensor], Tensor],
    ua: Tensor,
    fa: Tensor | None,
    ub: Tensor,
    owned: bool = False,
    fb: Tensor | None = None,
    fb_owned: bool = False,
) -> Tensor:
    """``(f(ub) - f(ua)) / (ub - ua)`` elementwise, ``f'(ua)`` where the inputs (nearly) agree.

    ``fa`` / ``fb`` may pass ``f(ua)`` / ``f(ub)`` when already computed (the pass at the other
    state keeps its outputs); ``owned`` lets ``ub``'s memory hold the difference, ``fb_owned``
    lets ``fb``'s hold the slope.
    """
    dtype = ua.dtype
    cdtype = _compute_dtype(dtype)
    if cdtype != dtype:
        ua, ub, fa, fb, owned = ua.to(cdtype), ub.to(cdtype), None, None, True
    if fa is None:
        fa = fn(ua)
    if fb is None:
        fb, fb_owned = fn(ub), True
    if cdtype == dtype:
        fused = _fused_quotient_secant(derivative, ua, fa, ub, fb, fb_owned)
        if fused is not None:
            return fused
    diff = ub.sub_(ua) if owned else ub - ua
    slope = fb.sub_(fa) if fb_owned else fb - fa
    slope.div_(diff)
    gap, tol = _close_gap(ua, diff, overwrite=True)
    return _fill_rare(slope, gap, ua, derivative, "close", tol).to(dtype)


def _fused_quotient_secant(derivative: Callable[[Tensor], Tensor], ua: Tensor, fa: Tensor, ub: Tensor, fb: Tensor,
                           fb_owned: bool) -> Tensor | None:
    """:func:`secant_slope`'s quotient and division-by-zero rule in one fused CPU pass (over
    ``fb`` where it may be overwritten, else new memory: ``ub`` stays as it is, for the rule),
    then the derivative where the rule applies; None where the kernel does not apply."""
    tol = _close_tol(ua.dtype)
    fused = kernels.quotient_secant(ua, fa, ub, fb, tol, out=fb if fb_owned else None)
    if fused is None:
        return None
    slope, close = fused
    if close is None:  # many: the derivative everywhere, put in place by a second pass
        deriv = derivative(ua).to(slope.dtype)
        if not kernels.close_fill(ua, ub, deriv, tol, slope):  # (a derivative laid out otherwise)
            slope = torch.where(close_mask(ua, ub - ua), deriv, slope)
    elif len(close):  # a few, found by the kernel
        _fill_at(slope, ua, close, derivative)
    return slope


def _fused_clamp_secant(exact: tuple[float, float] | bool, ua: Tensor, ub: Tensor, owned: bool = False,
                        fb: Tensor | None = None, fb_owned: bool = False) -> Tensor | None:
    """The exact secant of a clamp activation (``exact`` holds its bounds) in one fused CPU pass,
    written over ``fb`` or ``ub`` where they may be overwritten; None where the kernel does not
    apply (then the caller forms the quotient in PyTorch ops)."""
    if not isinstance(exact, tuple):
        return None
    return kernels.clamp_secant(ua, ub, *exact, out=_writable_out(ub, owned, fb, fb_owned))


def _output_and_slope(u: Tensor, ub: Tensor, call: Callable[[Tensor], Tensor], fn: Callable | None,
                      derivative: Callable | None, inplace: bool, exact: tuple[float, float] | bool, owned: bool,
                      closed_form: Callable | None = None, fb: Tensor | None = None,
                      fb_owned: bool = False) -> tuple[Tensor, Tensor]:
    """``(call(u), secant slope towards ub)`` of one site (see :class:`SecantActivation`);
    ``fn`` and ``derivative`` may be None where ``closed_form`` applies (same dtype)."""
    if closed_form is not None and _compute_dtype(u.dtype) == u.dtype:
        fa = None if inplace else call(u)  # an in-place call runs after the slope is formed
        slope = closed_form(u, fa, ub, fb, owned, fb_owned)
        y = call(u) if inplace else fa
    elif exact and _compute_dtype(u.dtype) == u.dtype:
        fused = _fused_clamp_secant(exact, u, ub, owned, fb, fb_owned)
        if fused is not None:
            slope, y = fused, call(u)  # the call after the slope: an in-place one overwrites u
        else:
            # Slopes 0 and 1 only (ReLU, ReLU6, Hardtanh): f(ub) − f(ua) is exact, so is the
            # quotient; only ub == ua needs the derivative, and for these clamp-like
            # functions f'(f(ua)) = f'(ua), so ua may be overwritten by an in-place call.
            if fb is None:
                fb, fb_owned = fn(ub), True
            diff = ub.sub_(u) if owned else ub - u
            y = call(u)
            slope = (fb.sub_(y) if fb_owned else fb - y).div_(diff)
            slope = _fill_exact_ties(slope, y, derivative)
    elif inplace:  # a copy of the input, then the model's call once (not f(u) out of place, then the call)
        ua = u.clone()
        y = call(u)
        slope = secant_slope(fn, derivative, ua, y, ub, owned, fb, fb_owned)
    else:
        y = call(u)
        slope = secant_slope(fn, derivative, u, y, ub, owned, fb, fb_owned)
    return y, slope


class SecantActivation(Function):
    """``y = call(u)``; backward ``g ⊙ s`` with ``s`` the secant slope towards ``ub``.

    ``call`` runs the model's own call (same kernel, same output as without ttadapt);
    ``inplace`` calls modify ``u`` and return it, which autograd is told of. ``owned`` says
    ``ub`` is a private copy that may be overwritten (saves one allocation per site).
    """

    @staticmethod
    def forward(ctx: Any, u: Tensor, ub: Tensor, call: Callable[[Tensor], Tensor], fn: Callable, derivative: Callable, inplace: bool, exact: tuple[float, float] | bool, owned: bool, closed_form: Callable | None = None, fb: Tensor | None = None, fb_owned: bool = False) -> Tensor:  # type: ignore[override]
        y, slope = _output_and_slope(u, ub, call, fn, derivative, inplace, exact, owned, closed_form, fb, fb_owned)
        if inplace:
            ctx.mark_dirty(u)
        ctx.save_for_backward(slope)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        (slope,) = ctx.saved_tensors
        return (grad * slope,) + (None,) * 10


def secant_product(u: Tensor, y: Tensor, slope: Tensor) -> Tensor:
    """A tensor holding ``y`` whose autograd node is PyTorch's own ``MulBackward0`` of
    ``u * slope``: its backward is ``g ⊙ slope``, run natively — no Python per site in the
    backward, unlike an autograd function.

    ``y`` must not require a gradient; the product's values are replaced by ``y``'s (its memory
    taken over, not copied): the node saved ``slope``, not the product, so nothing autograd
    checks is changed.
    """
    z = u * slope
    z.data = y
    return z


def _prelu_slopes(ua: Tensor, ub: Tensor, wa: Tensor, wb: Tensor) -> tuple[Tensor, Tensor]:
    """PReLU's averaged derivatives along the segment.

    With ``m(u) = min(0, u)``: ``f(u; a) = relu(u) + a·m(u)``. The input slope is the secant of
    ``relu`` plus the *mean* slope parameter times the secant of ``m``; the slope parameter's
    derivative ``m(u)`` averaged over a linear path of ``u`` is the secant of ``m(u)²/2``.
    Both are exact while the slope parameter does not move.
    """
    dtype = ua.dtype
    cdtype = _compute_dtype(dtype)
    ua, ub = ua.to(cdtype), ub.to(cdtype)
    a_mean = _prelu_weight((wa.to(cdtype) + wb.to(cdtype)) / 2, ua)
    ma, mb = ua.clamp(max=0), ub.clamp(max=0)
    diff = ub - ua
    close = close_mask(ua, diff)
    s_u = (torch.relu(ub) - torch.relu(ua) + a_mean * (mb - ma)) / diff
    s_w = (mb.square() - ma.square()) / (2 * diff)
    if ua.device.type != "cpu" or bool(close.any()):
        a_graph = _prelu_weight(wa.to(cdtype), ua)
        s_u = torch.where(close, torch.where(ua > 0, torch.ones_like(ua), a_graph.expand_as(ua)), s_u)
        s_w = torch.where(close, ma, s_w)
    return s_u.to(dtype), s_w.to(dtype)


class SecantPReLU(Function):
    """``torch.prelu(u, w)`` with both gradients averaged towards ``(ub, wb)``."""

    @staticmethod
    def forward(ctx: Any, u: Tensor, weight: Tensor, ub: Tensor, wb: Tensor) -> Tensor:  # type: ignore[override]
        s_u, s_w = _prelu_slopes(u, ub, weight, wb)
        ctx.save_for_backward(s_u, s_w)
        ctx.weight_shape = weight.shape
        ctx.weight_numel = weight.numel()
        return torch.prelu(u, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        s_u, s_w = ctx.saved_tensors
        gw = grad * s_w
        if ctx.weight_numel == 1 or gw.dim() < 2:
            gw = gw.sum() if ctx.weight_numel == 1 else gw
        else:
            dims = [0] + list(range(2, gw.dim()))
            gw = gw.sum(dim=dims)
        return grad * s_u, gw.reshape(ctx.weight_shape), None, None


class SecantModule(Function):
    """A whole activation-module call as one site (composite activations such as NewGELU)."""

    @staticmethod
    def forward(ctx: Any, u: Tensor, ub: Tensor, forward: Callable[[Tensor], Tensor], derivative: Callable[[Tensor], Tensor],
                owned: bool = False, fb: Tensor | None = None, fb_owned: bool = False) -> Tensor:  # type: ignore[override]
        y = forward(u)
        ctx.save_for_backward(secant_slope(forward, derivative, u, y, ub, owned, fb, fb_owned))
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        (slope,) = ctx.saved_tensors
        return grad * slope, None, None, None, None, None, None


class SecantPassThrough(Function):
    """Forward ``y`` (computed elsewhere, with its own graph to module parameters); the input
    ``u`` receives ``g ⊙ slope``. Used for activation modules that own parameters (xIELU)."""

    @staticmethod
    def forward(ctx: Any, u: Tensor, y: Tensor, slope: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(slope)
        return y.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        (slope,) = ctx.saved_tensors
        return grad * slope, grad, None


# ------------------------------------------------------------------------------------------
# Linear variant (Eq. 11)
# ------------------------------------------------------------------------------------------
class AveragedAffine(Function):
    """Linear / Conv{1,2,3}d whose backward uses ``W̄ = (W + Wb)/2`` for the input gradient and
    ``ū = (u + ub)/2`` for the weight gradient; the bias gradient is ordinary.

    It keeps references to ``u``, ``W`` (alive in the graph anyway), ``ub`` (the kept input of
    the other pass) and ``Wb`` (the caller's state), and forms the means in the backward, one
    layer at a time: no parameter-sized copies live across the backward.
    """

    @staticmethod
    def forward(ctx: Any, u: Tensor, weight: Tensor, bias: Tensor | None, ub: Tensor, wb: Tensor, kind: str, conv_args: tuple) -> Tensor:  # type: ignore[override]
        if kind == "linear":
            y = torch.nn.functional.linear(u, weight, bias)
        else:
            y = _CONV[kind](u, weight, bias, *conv_args)
        ctx.save_for_backward(u, weight, ub, wb)
        ctx.kind, ctx.conv_args, ctx.has_bias = kind, conv_args, bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        u, weight, ub, wb = ctx.saved_tensors
        need_u, need_w, need_b = ctx.needs_input_grad[:3]
        u_mean = torch.add(u, ub).mul_(0.5) if need_w else u
        w_mean = torch.add(weight, wb).mul_(0.5) if need_u else weight
        gu, gw, gb = _affine_grads(ctx.kind, ctx.conv_args, ctx.has_bias, (need_u, need_w, need_b), grad, u_mean, w_mean)
        return gu, gw, gb, None, None, None, None


def _affine_grads(kind: str, conv_args: tuple, has_bias: bool, needs: tuple[bool, bool, bool], grad: Tensor,
                  u: Tensor, weight: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of a Linear / Conv call w.r.t. input, weight and bias, with the input gradient
    taken through ``weight`` and the weight gradient from ``u`` (the means, for Eq. 11)."""
    need_u, need_w, need_b = needs
    if kind == "linear":
        gu = grad.matmul(weight) if need_u else None
        g2 = grad.reshape(-1, grad.shape[-1])
        gw = g2.t().matmul(u.reshape(-1, u.shape[-1])) if need_w else None
        gb = g2.sum(0) if (need_b and has_bias) else None
        return gu, gw, gb
    stride, padding, dilation, groups = conv_args
    nd = {"conv1d": 1, "conv2d": 2, "conv3d": 3}[kind]
    unbatched = u.dim() == nd + 1
    if unbatched:
        u, grad = u.unsqueeze(0), grad.unsqueeze(0)
    if isinstance(padding, str):  # "same" / "valid": differentiate the call itself at (u, W)
        with torch.enable_grad():
            uu = u.detach().requires_grad_(need_u)
            ww = weight.detach().requires_grad_(need_w)
            out = _CONV[kind](uu, ww, None, stride, padding, dilation, groups)
            inputs = [t for t, need in ((uu, need_u), (ww, need_w)) if need]
            grads = iter(torch.autograd.grad(out, inputs, grad) if inputs else ())
        gu = next(grads) if need_u else None
        gw = next(grads) if need_w else None
    else:
        gu, gw, _ = torch.ops.aten.convolution_backward(
            grad, u, weight, None,
            _tuple(stride, nd), _tuple(padding, nd), _tuple(dilation, nd),
            False, [0] * nd, groups, [need_u, need_w, False],
        )
    gb = grad.sum(dim=[0] + list(range(2, grad.dim()))) if (need_b and has_bias) else None
    if unbatched and gu is not None:
        gu = gu.squeeze(0)
    return gu, gw, gb


def _tuple(value: Any, n: int) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    value = list(value)
    return value * n if len(value) == 1 else value


_CONV = {
    "conv1d": torch.nn.functional.conv1d,
    "conv2d": torch.nn.functional.conv2d,
    "conv3d": torch.nn.functional.conv3d,
}


def bind_settings(f: Callable | None, settings: dict) -> Callable | None:
    """``f`` with one call's settings bound as keywords (``f`` itself without settings; None
    stays None)."""
    if f is None or not settings:
        return f
    return lambda *a: f(*a, **settings)


def activation_callables(act: Activation, settings: dict) -> tuple[Callable, Callable, Callable | None]:
    """``(fn, derivative, closed_form secant or None)`` of a registered activation with one call's
    settings bound."""
    derivative = lambda x: act.derivative(x, **settings)  # noqa: E731
    return bind_settings(act.fn, settings), derivative, bind_settings(act.secant, settings)


# Sites of up to this many elements use secant_product: its product is a transient tensor of the
# site's size (at most 256 KB in float32); on larger sites the autograd function's Python costs
# little next to the arithmetic, and it adds no memory. (secant_product assigns `.data`: plain
# tensors only, outside torch.func transforms, whose wrapped tensors look plain.)
PRODUCT_MAX = 1 << 16


def averaged_activation_output(act: Activation, call: Callable[[Tensor], Tensor], u: Tensor, ub: Tensor, settings: dict, inplace: bool,
                               owned: bool = False, fb: Tensor | None = None, fb_owned: bool = False) -> Tensor:
    """The output of one site of a registered activation at the graph state, whose backward is
    ``g ⊙`` secant towards ``ub`` (``fb``: the output at the other state, when that pass kept
    it): the model's own call and the slope under no_grad, joined by :func:`secant_product`
    (a native backward) on sites up to :data:`PRODUCT_MAX` elements, else
    :class:`SecantActivation`."""
    if (not inplace and u.numel() <= PRODUCT_MAX and type(u) is Tensor and torch.is_grad_enabled()
            and not torch._C._are_functorch_transforms_active()):
        # this runs once per site and pass, on sites of a few thousand elements: every µs of
        # Python shows (no context-manager object, no callables the closed form does not need)
        closed_form = bind_settings(act.secant, settings)
        if closed_form is not None and _compute_dtype(u.dtype) == u.dtype:
            fn = derivative = None  # (the closed form needs neither)
        else:
            fn, derivative, closed_form = activation_callables(act, settings)
        torch._C._set_grad_enabled(False)
        try:
            y, slope = _output_and_slope(u, ub, call, fn, derivative, False, act.exact(settings), owned, closed_form, fb,
                                         fb_owned)
        finally:
            torch._C._set_grad_enabled(True)
        if type(y) is Tensor and y.shape == u.shape and y.dtype == u.dtype == slope.dtype:
            return secant_product(u, y, slope)
        return SecantPassThrough.apply(u, y, slope)  # (not met by the registered activations)
    fn, derivative, closed_form = activation_callables(act, settings)
    return SecantActivation.apply(u, ub, call, fn, derivative, inplace, act.exact(settings), owned, closed_form, fb, fb_owned)
