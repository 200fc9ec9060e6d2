"""The registry of elementwise activations that the averaged backward knows.

An *activation* here is a unary elementwise function ``y = f(u)`` (optionally with scalar
settings such as LeakyReLU's slope). For each one the registry holds

* ``fn(u, **settings)``: the function, out of place;
* ``deriv(u, **settings)``: its derivative ``f'(u)``, used where the secant is undefined
  (the two states' inputs coincide) — ``None`` means "derive it with autograd from ``fn``";
* the *call forms* under which a model may invoke it (``F.relu``, ``torch.relu_``,
  ``Tensor.relu``, ...), each saying how its arguments map to settings and whether it works
  in place;
* ``kinks``: the inputs where ``f`` is not smooth (``f'`` jumps, or has a corner) — exact
  references split a quadrature there.

Activations whose forward is a composite Python expression (Hugging Face's
``NewGELUActivation`` computes ``0.5·x·(1 + tanh(...))``) cannot be averaged op by op: the product
of two functions of ``x`` would keep its ordinary derivative. They are registered by *module
class* instead, and the whole module call is one site.

Adding an activation is one call to :func:`register_activation` (functional forms) or
:func:`register_module_activation` (module classes).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .rare import _by_blocks, _fill_at, _fill_exact_ties, _writable_out

__all__ = [
    "Activation",
    "CallForm",
    "ModuleActivation",
    "register_activation",
    "register_module_activation",
    "unregister_activation",
    "registered_activations",
    "registered_module_activations",
    "lookup_call",
    "lookup_module",
    "UNAVERAGED_POINTWISE",
]


@dataclass(frozen=True)
class CallForm:
    """One way a model can call an activation.

    ``settings`` names the arguments after the input, in positional order; ``inplace`` is
    ``True`` for an always-in-place callable (``torch.relu_``) or the name of the boolean
    argument that selects in-place work (``"inplace"`` for ``F.relu``).
    """

    func: Callable[..., Any]
    settings: tuple[str, ...] = ()
    inplace: bool | str = False

    def __post_init__(self) -> None:
        names = ("input", *self.settings, *((self.inplace,) if isinstance(self.inplace, str) else ()))
        object.__setattr__(self, "_names", names)

    def bind(self, args: tuple, kwargs: dict) -> tuple[Tensor, dict[str, Any], bool]:
        """Split a call's arguments into (input, settings, in place?)."""
        names = self._names
        if len(args) == 1 and not kwargs:  # the common case: f(u)
            return args[0], {}, self.inplace is True
        bound: dict[str, Any] = {}
        if len(args) > len(names):
            raise TypeError(f"{_func_name(self.func)}() got {len(args)} positional arguments")
        bound.update(zip(names, args))
        for key, value in kwargs.items():
            if key == "self":  # Tensor methods called as torch.Tensor.relu(self=x)
                key = "input"
            bound[key] = value
        inplace = self.inplace is True or (isinstance(self.inplace, str) and bool(bound.pop(self.inplace, False)))
        u = bound.pop("input")
        return u, bound, inplace


@dataclass(frozen=True)
class Activation:
    """An elementwise activation averaged by its call forms (see the module docstring)."""

    name: str
    fn: Callable[..., Tensor]
    deriv: Callable[..., Tensor] | None
    forms: tuple[CallForm, ...]
    defaults: dict[str, Any] = field(default_factory=dict)
    kinks: Callable[..., tuple[float, ...]] = lambda **_: ()
    parametric: bool = False  # PReLU: a tensor setting with its own gradient
    # Slopes 0 and 1 only (ReLU, ReLU6, Hardtanh): f(ub) - f(ua) is then computed without
    # cancellation, so the plain secant is exact and the derivative is needed only where ub == ua.
    exact_secant: bool = False
    # A closed form secant(ua, fa, ub, fb=None, owned=False, fb_owned=False, **settings) -> slope
    # that is well conditioned everywhere (no cancellation, so no close-inputs rule; where
    # ub == ua exactly it returns the derivative): more accurate and fewer elementwise passes
    # than the generic quotient. fa = f(ua) or None (not yet computed: an in-place call), fb =
    # f(ub) when the other pass kept it; owned / fb_owned allow overwriting ub / fb.
    secant: Callable[..., Tensor] | None = None
    # vjp(grad, u, y, **settings) -> grad ⊙ f'(u) in one kernel (ATen's own backward; y = f(u)):
    # the ordinary backward of AG-1 / AG-2's graph pass where the call is not one native op
    # (those keep PyTorch's own node, see ttadapt.deferred), as fast as PyTorch's.
    vjp: Callable[..., Tensor] | None = None
    # clamp(**settings) -> (lo, hi) for f(u) = min(max(u, lo), hi) (ReLU, ReLU6, Hardtanh): an
    # exact secant that the fused CPU kernel (ttadapt.kernels.clamp_secant) forms in one pass.
    clamp: Callable[..., tuple[float, float]] | None = None
    # grad_secant(grad, ua, fa, ub, fb, out, **settings) -> grad ⊙ secant in one fused pass (the
    # derivative where the inputs tie), written into ``out`` where given, or None where no kernel
    # applies: the averaged backward of AG-1 / AG-2's graph pass for these sites. fa = f(ua) and
    # fb = f(ub) where at hand, else None.
    grad_secant: Callable[..., Tensor | None] | None = None
    # secant_forms_fb(u) -> whether ``secant`` (and ``grad_secant``) do without f(ub) for inputs
    # like u — form it as cheaply as they would read it, or never read it (the fused CPU kernels
    # of Tanh and of the ELU family): the pass at the other state then keeps only the inputs, not
    # the outputs too
    secant_forms_fb: Callable[[Tensor], bool] | None = None
    # checked_secant(ua, fa, ub, fb, out) -> None: the secant slope into ``out`` by a fused CPU
    # kernel, for a call without settings on tensors the caller has checked (contiguous float32
    # CPU tensors of one shape, under ttadapt.kernels.PARALLEL_MIN elements, kernels loaded; fb
    # may be None): the small sites of a pass at the graph state, where the general route's
    # checks and layers cost more than the arithmetic
    checked_secant: Callable[[Tensor, Tensor, Tensor, Tensor | None, Tensor], None] | None = None
    # record_forward(u, **settings) -> f(u) or None: a faster f for the no-graph pass at the
    # other state (new memory, within a few ulps of ``fn``; that pass's outputs feed only the
    # other state's own pre-activations, never the model's output or a graph), None where it
    # does not apply; the call itself runs then
    record_forward: Callable[..., Tensor | None] | None = None

    def exact(self, settings: dict[str, Any]) -> tuple[float, float] | bool:
        """How the secant of one call may be formed exactly: the clamp bounds ``(lo, hi)`` of a
        clamp, else :attr:`exact_secant` (True: the plain quotient is exact; False: it is not)."""
        if self.clamp is not None:
            return tuple(float(v) for v in self.clamp(**settings))  # type: ignore[return-value]
        return self.exact_secant

    def settings(self, given: dict[str, Any]) -> dict[str, Any]:
        """The full settings of one call: the defaults overlaid with what the call gave."""
        return {**self.defaults, **given}

    def derivative(self, u: Tensor, **settings: Any) -> Tensor:
        """``f'(u)``, elementwise."""
        if self.deriv is not None:
            return self.deriv(u, **settings)
        return _autograd_derivative(lambda x: self.fn(x, **settings), u)


@dataclass(frozen=True)
class ModuleActivation:
    """An activation registered by module class: a call of such a module is one site.

    ``fn`` is the module's own ``forward``; ``deriv(module, u)`` may give ``f'(u)`` in closed
    form, else autograd derives it from the forward.
    """

    name: str
    cls: type
    deriv: Callable[[nn.Module, Tensor], Tensor] | None = None
    kinks: Callable[[nn.Module], tuple[float, ...]] = lambda module: ()

    def derivative(self, module: nn.Module, forward: Callable[[Tensor], Tensor], u: Tensor) -> Tensor:
        if self.deriv is not None:
            return self.deriv(module, u)
        return _autograd_derivative(forward, u)


def _autograd_derivative(fn: Callable[[Tensor], Tensor], u: Tensor) -> Tensor:
    """f'(u) of an elementwise ``fn`` by one vector-Jacobian product with a vector of ones."""
    with torch.enable_grad():
        x = u.detach().requires_grad_(True)
        y = fn(x)
        (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
    return g


def _func_name(func: Callable) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    if func in _TENSOR_METHODS:
        return f"Tensor.{name}"
    return name


_ACTIVATIONS: dict[str, Activation] = {}
_CALLS: dict[Any, tuple[Activation, CallForm]] = {}
_MODULE_ACTIVATIONS: dict[type, ModuleActivation] = {}
_GENERATION = 0  # bumped by every change to _CALLS or _MODULE_ACTIVATIONS (see registry_version)
_TENSOR_METHODS: set = set()


def register_activation(
    name: str,
    fn: Callable[..., Tensor],
    deriv: Callable[..., Tensor] | None,
    forms: Iterable[CallForm],
    *,
    defaults: dict[str, Any] | None = None,
    kinks: Callable[..., tuple[float, ...]] | None = None,
    parametric: bool = False,
    exact_secant: bool = False,
    secant: Callable[..., Tensor] | None = None,
    vjp: Callable[..., Tensor] | None = None,
    clamp: Callable[..., tuple[float, float]] | None = None,
    grad_secant: Callable[..., Tensor | None] | None = None,
    secant_forms_fb: Callable[[Tensor], bool] | None = None,
    checked_secant: Callable[[Tensor, Tensor, Tensor, Tensor | None, Tensor], None] | None = None,
    record_forward: Callable[..., Tensor | None] | None = None,
) -> Activation:
    """Register an elementwise activation and the callables that compute it.

    Example — a user's own activation, called as ``my_ops.swish(x, beta)``::

        register_activation(
            "swish", fn=lambda u, beta=1.0: u * torch.sigmoid(beta * u), deriv=None,
            forms=[CallForm(my_ops.swish, settings=("beta",))], defaults={"beta": 1.0})

    The callables must dispatch through ``__torch_function__`` (every torch function does; a
    plain Python function can with ``torch.overrides.handle_torch_function``), or be called
    inside a module registered with :func:`register_module_activation`.

    ``exact_secant``: the activation's slopes are 0 and 1 only, so the plain quotient is exact;
    ``clamp``: it is ``min(max(u, lo), hi)`` with ``(lo, hi) = clamp(**settings)`` (implies
    ``exact_secant``; on the CPU its secant is then one fused pass, see :mod:`ttadapt.kernels`,
    and so is ``g ⊙`` secant, its default ``grad_secant``); ``secant`` / ``vjp`` /
    ``grad_secant`` / ``secant_forms_fb`` / ``checked_secant`` / ``record_forward``: see
    :class:`Activation`.
    """
    global _GENERATION
    forms = tuple(forms)
    if grad_secant is None and clamp is not None:
        grad_secant = _clamp_grad_secant(clamp)
    if checked_secant is None and clamp is not None and not (defaults or any(f.settings for f in forms)):
        checked_secant = _clamp_checked_secant(*clamp())
    act = Activation(name, fn, deriv, forms, dict(defaults or {}), kinks or (lambda **_: ()), parametric,
                     exact_secant or clamp is not None, secant, vjp, clamp, grad_secant, secant_forms_fb, checked_secant,
                     record_forward)
    for form in forms:
        if form.func in _CALLS and _CALLS[form.func][0].name != name:
            raise ValueError(f"{_func_name(form.func)} is already registered as {_CALLS[form.func][0].name!r}")
    _ACTIVATIONS[name] = act
    for form in forms:
        _CALLS[form.func] = (act, form)
    _GENERATION += 1
    return act


def register_module_activation(
    name: str,
    cls: type,
    deriv: Callable[[nn.Module, Tensor], Tensor] | None = None,
    kinks: Callable[[nn.Module], tuple[float, ...]] | None = None,
) -> ModuleActivation:
    """Register a module class whose every call is one activation site (see module docstring)."""
    global _GENERATION
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_module_activation needs an nn.Module subclass, got {cls!r}")
    entry = ModuleActivation(name, cls, deriv, kinks or (lambda module: ()))
    _MODULE_ACTIVATIONS[cls] = entry
    _GENERATION += 1
    return entry


def _clamp_grad_secant(clamp: Callable[..., tuple[float, float]]) -> Callable[..., Tensor | None]:
    """``grad_secant`` of a clamp activation: :func:`ttadapt.kernels.clamp_secant` with ``grad``."""
    def grad_secant(g: Tensor, ua: Tensor, fa: Tensor | None, ub: Tensor, fb: Tensor | None, out: Tensor | None,
                    **settings: Any) -> Tensor | None:
        lo, hi = clamp(**settings)
        return kernels.clamp_secant(ua, ub, float(lo), float(hi), out=out, grad=g)

    return grad_secant


def _clamp_checked_secant(lo: float, hi: float) -> Callable[[Tensor, Tensor, Tensor, Tensor | None, Tensor], None]:
    """``checked_secant`` of a clamp activation without settings (ReLU, ReLU6)."""
    lo, hi = float(lo), float(hi)

    def checked_secant(ua: Tensor, fa: Tensor, ub: Tensor, fb: Tensor | None, out: Tensor) -> None:
        kernels.clamp_secant_checked(ua, ub, lo, hi, out)

    return checked_secant


def unregister_activation(name_or_cls: str | type) -> None:
    """Remove an activation added by :func:`register_activation` (by name) or
    :func:`register_module_activation` (by class)."""
    global _GENERATION
    if isinstance(name_or_cls, type):
        if _MODULE_ACTIVATIONS.pop(name_or_cls, None) is None:
            raise KeyError(f"{name_or_cls.__qualname__} is not a registered activation module")
        _GENERATION += 1
        return
    act = _ACTIVATIONS.pop(name_or_cls, None)
    if act is None:
        raise KeyError(f"no activation named {name_or_cls!r}")
    for form in act.forms:
        _CALLS.pop(form.func, None)
    _GENERATION += 1


def registered_activations() -> dict[str, Activation]:
    """Every functional-form activation, by name."""
    return dict(_ACTIVATIONS)


def registered_module_activations() -> dict[type, ModuleActivation]:
    """Every module-class activation, by class (imports transformers, if installed, to list its
    activation classes)."""
    _ensure_transformers(import_it=True)
    return dict(_MODULE_ACTIVATIONS)


def lookup_call(func: Any) -> tuple[Activation, CallForm] | None:
    """The activation a torch-function call computes, or ``None``."""
    try:
        return _CALLS.get(func)
    except TypeError:  # unhashable callable
        return None


def registry_version() -> tuple[int, int, int]:
    """Changes whenever the registries of calls and module classes do: what a result worked out
    from them may be cached under (the tables' identities too, for code that swaps a table).
    Registers the transformers classes first once transformers is imported, as
    :func:`lookup_module` does."""
    if not _TRANSFORMERS_DONE and "transformers" in sys.modules:
        _ensure_transformers(import_it=False)
    return id(_CALLS), id(_MODULE_ACTIVATIONS), _GENERATION


def lookup_module(module: nn.Module) -> ModuleActivation | None:
    """The module-class activation ``module`` is an instance of, or ``None``."""
    if not _TRANSFORMERS_DONE and "transformers" in sys.modules:
        _ensure_transformers(import_it=False)
    for cls in type(module).__mro__:
        entry = _MODULE_ACTIVATIONS.get(cls)
        if entry is not None:
            return entry
    return None


# --------------------------------------------------------------------------------------------
# The built-in activations. Derivatives call ATen's own backward kernels with a gradient of
# ones where one exists, so the fallback matches ordinary autograd to the last bit.
# --------------------------------------------------------------------------------------------
aten = torch.ops.aten
T = torch.Tensor


def _ones(u: Tensor) -> Tensor:
    """The all-ones output gradient that turns an ATen backward kernel into the derivative: a
    cached 1 expanded to ``u``'s shape (no full-size allocation and fill)."""
    return _one(u).expand_as(u)


def _method(*names: str) -> list:
    methods = [getattr(torch.Tensor, n) for n in names]
    _TENSOR_METHODS.update(methods)
    return methods


def _forms(out_of_place: Iterable, in_place: Iterable = (), settings: tuple[str, ...] = (), inplace_arg=None):
    forms = [CallForm(f, settings, inplace_arg or False) for f in out_of_place]
    forms += [CallForm(f, settings, True) for f in in_place]
    return forms


register_activation(
    "relu",
    torch.relu,
    lambda u: (u > 0).to(u.dtype),
    [CallForm(F.relu, (), "inplace")] + _forms([torch.relu, *_method("relu")], [torch.relu_, *_method("relu_")]),
    kinks=lambda: (0.0,),
    clamp=lambda: (0.0, math.inf),
    vjp=lambda g, u, y: aten.threshold_backward(g, u, 0),
)
register_activation(
    "relu6",
    F.relu6,
    lambda u: ((u > 0) & (u < 6)).to(u.dtype),
    [CallForm(F.relu6, (), "inplace")],
    kinks=lambda: (0.0, 6.0),
    clamp=lambda: (0.0, 6.0),
    vjp=lambda g, u, y: aten.hardtanh_backward(g, u, 0.0, 6.0),
)
# Elements per block of the closed-form secants below: two block-sized temporaries (1 MB in
# float32) at a time, no more than the generic quotient's (see benchmarks/engine_cost.py).
_SECANT_BLOCK = 1 << 17


def _relu_part(ua: Tensor, ub: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
    """``(R, scratch)``: ``R = max(ub, 0) − max(ua, 0)`` written to ``out`` and a new tensor of
    ``ua``'s shape free for reuse.

    ``R`` carries no rounding of its own where the inputs have opposite signs (one term is 0)
    and where both are positive it is rounded exactly as ``d = ub − ua`` (so ``R / d = 1``);
    ``H = d − R = min(ub, 0) − min(ua, 0)`` likewise where both are negative.
    """
    scratch = ua.clamp(min=0)
    return torch.clamp(ub, min=0, out=out).sub_(scratch), scratch


def _blockwise_secant(step: Callable[..., None], derivative: Callable[[Tensor], Tensor], ua: Tensor, ub: Tensor,
                      fb: Tensor | None, fb_owned: bool, *more: Tensor) -> Tensor:
    """Run a closed-form secant's elementwise ``step(out, ua, ub, *more)`` a block at a time into
    the kept output's memory when the engine may overwrite it (else new memory), then take the
    derivative where the inputs tie exactly (0/0)."""
    out = fb if fb_owned and fb is not None else torch.empty_like(ua)
    return _fill_exact_ties(_by_blocks(step, out, ua, ub, *more, block=_SECANT_BLOCK), ua, derivative)


def _leaky_relu_derivative(u: Tensor, negative_slope: float = 0.01) -> Tensor:
    return aten.leaky_relu_backward(_ones(u), u, negative_slope, False)


def _leaky_relu_secant(ua: Tensor, fa: Tensor | None, ub: Tensor, fb: Tensor | None = None, owned: bool = False,
                       fb_owned: bool = False, negative_slope: float = 0.01) -> Tensor:
    """``f(u) = max(u, 0) + ν·min(u, 0)``: the secant is ``(R + ν·H) / d`` with ``d = ub − ua``
    and ``H = d − R`` (see :func:`_relu_part`), a block at a time (block-sized temporaries).

    The plain quotient cancels where both inputs are negative and close (``ν·ub`` and ``ν·ua``
    are rounded before the subtraction); this form does not. Only ``d = 0`` is 0/0: the
    derivative is taken there.
    """
    def step(out: Tensor, ua: Tensor, ub: Tensor) -> None:
        r, scratch = _relu_part(ua, ub, out)
        d = ub.sub_(ua) if owned else ub - ua
        r.add_(torch.sub(d, r, out=scratch), alpha=negative_slope).div_(d)  # (R + ν·H) / d

    return _blockwise_secant(step, lambda u: _leaky_relu_derivative(u, negative_slope), ua, ub, fb, fb_owned)


register_activation(
    "leaky_relu",
    lambda u, negative_slope=0.01: F.leaky_relu(u, negative_slope),
    _leaky_relu_derivative,
    [CallForm(F.leaky_relu, ("negative_slope",), "inplace"), CallForm(F.leaky_relu_, ("negative_slope",), True)],
    defaults={"negative_slope": 0.01},
    kinks=lambda negative_slope=0.01: (0.0,),
    secant=_leaky_relu_secant,
    vjp=lambda g, u, y, negative_slope=0.01: aten.leaky_relu_backward(g, u, negative_slope, False),
)
register_activation(
    "prelu",
    lambda u, weight: torch.prelu(u, weight),
    lambda u, weight: torch.where(u > 0, torch.ones_like(u), _prelu_weight(weight, u).expand_as(u)),
    [CallForm(torch.prelu, ("weight",))],
    kinks=lambda weight=None: (0.0,),
    parametric=True,
)


def _prelu_weight(weight: Tensor, u: Tensor) -> Tensor:
    """PReLU's slope broadcast against its input (channels on dim 1, as ``torch.prelu``)."""
    if weight.numel() == 1 or u.dim() < 2:
        return weight.reshape(()) if weight.numel() == 1 else weight
    return weight.reshape((1, -1) + (1,) * (u.dim() - 2))


def _exp_linear_secant(ua: Tensor, ub: Tensor, owned: bool, fb: Tensor | None, fb_owned: bool, alpha: float,
                       scale: float, input_scale: float) -> Tensor:
    """:func:`_exp_linear_secant_torch` in one fused pass where :func:`ttadapt.kernels.exp_linear_secant`
    applies (then the derivative where the inputs tie, as there)."""
    fused = kernels.exp_linear_secant_ties(ua, ub, alpha, scale, input_scale, out=_writable_out(ub, owned, fb, fb_owned))
    if fused is None:
        return _exp_linear_secant_torch(ua, ub, owned, fb, fb_owned, alpha, scale, input_scale)
    slope, ties = fused
    derivative = lambda u: _exp_linear_derivative(u, alpha, scale, input_scale)  # noqa: E731
    if ties is None:  # many: the general search
        return _fill_exact_ties(slope, ua, derivative)
    if len(ties):  # a few, found by the kernel: ATen's derivative there
        # (ATen's scalar path, which a few elements take, gives 1 at a NaN input; its vector path NaN)
        _fill_at(slope, ua, ties, lambda at: torch.where(at.isnan(), at, derivative(at)))
    return slope


def _exp_linear_derivative(u: Tensor, alpha: float, scale: float, input_scale: float) -> Tensor:
    return aten.elu_backward(_ones(u), alpha, scale, input_scale, False, u)


def _exp_linear_secant_torch(ua: Tensor, ub: Tensor, owned: bool, fb: Tensor | None, fb_owned: bool, alpha: float,
                             scale: float, input_scale: float) -> Tensor:
    """Secant of ``f(u) = s·(max(u, 0) + α·expm1(κ·min(u, 0)))`` (ELU, SELU, CELU), without
    cancellation.

    With ``d = ub − ua``, ``m = min(·, 0)``, ``R`` and ``H = mb − ma`` (see :func:`_relu_part`)
    and ``expm1(κH) = tanh(κH/2)·(1 + e^{κH})``:

        f(ub) − f(ua) = s·(R + α·e^{κ ma}·expm1(κH)) = s·(R + α·tanh(κH/2)·(e^{κ ma} + e^{κ mb}))

    Every factor is well conditioned and bounded (``e^{κm} ≤ 1`` for ``κ > 0``), so the slope
    keeps full relative accuracy where the plain quotient loses ``eps/|d|`` (saturated or close
    inputs). Only ``d = 0`` is 0/0: the derivative is taken there. Computed a block at a time
    (block-sized temporaries).
    """
    def step(out: Tensor, ua: Tensor, ub: Tensor) -> None:
        e = ub.clamp(max=0)
        r, ma = _relu_part(ua, ub, out)
        d = ub.sub_(ua) if owned else ub - ua
        torch.clamp(ua, max=0, out=ma)
        if input_scale != 1.0:
            e.mul_(input_scale)
            ma.mul_(input_scale)
        e.exp_().add_(ma.exp_())  # e^{κ mb} + e^{κ ma}
        h = torch.sub(d, r, out=ma)  # H
        r.addcmul_(h.mul_(input_scale / 2).tanh_(), e, value=alpha).div_(d)
        if scale != 1.0:
            r.mul_(scale)

    return _blockwise_secant(step, lambda u: _exp_linear_derivative(u, alpha, scale, input_scale), ua, ub, fb, fb_owned)


register_activation(
    "elu",
    lambda u, alpha=1.0: F.elu(u, alpha),
    lambda u, alpha=1.0: aten.elu_backward(_ones(u), alpha, 1.0, 1.0, False, u),
    [CallForm(F.elu, ("alpha",), "inplace"), CallForm(F.elu_, ("alpha",), True)],
    defaults={"alpha": 1.0},
    kinks=lambda alpha=1.0: (0.0,),
    secant=lambda ua, fa, ub, fb=None, owned=False, fb_owned=False, alpha=1.0: _exp_linear_secant(
        ua, ub, owned, fb, fb_owned, alpha, 1.0, 1.0),
    vjp=lambda g, u, y, alpha=1.0: aten.elu_backward(g, alpha, 1.0, 1.0, False, u),
    grad_secant=lambda g, ua, fa, ub, fb, out, alpha=1.0: kernels.exp_linear_secant(ua, ub, alpha, 1.0, 1.0, out=out, grad=g),
    secant_forms_fb=kernels.fits,
    record_forward=lambda u, alpha=1.0: kernels.exp_linear(u, alpha, 1.0, 1.0),
)
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946
register_activation(
    "selu",
    torch.selu,
    lambda u: aten.elu_backward(_ones(u), _SELU_ALPHA, _SELU_SCALE, 1.0, False, u),
    [CallForm(F.selu, (), "inplace")] + _forms([torch.selu], [torch.selu_]),
    kinks=lambda: (0.0,),
    secant=lambda ua, fa, ub, fb=None, owned=False, fb_owned=False: _exp_linear_secant(
        ua, ub, owned, fb, fb_owned, _SELU_ALPHA, _SELU_SCALE, 1.0),
    vjp=lambda g, u, y: aten.elu_backward(g, _SELU_ALPHA, _SELU_SCALE, 1.0, False, u),
    grad_secant=lambda g, ua, fa, ub, fb, out: kernels.exp_linear_secant(ua, ub, _SELU_ALPHA, _SELU_SCALE, 1.0, out=out, grad=g),
    secant_forms_fb=kernels.fits,
    record_forward=lambda u: kernels.exp_linear(u, _SELU_ALPHA, _SELU_SCALE, 1.0),
)
register_activation(
    "celu",
    lambda u, alpha=1.0: torch.celu(u, alpha),
    lambda u, alpha=1.0: aten.elu_backward(_ones(u), alpha, 1.0, 1.0 / alpha, False, u),
    [CallForm(F.celu, ("alpha",), "inplace")] + _forms([torch.celu], [torch.celu_], ("alpha",)),
    defaults={"alpha": 1.0},
    kinks=lambda alpha=1.0: (0.0,),
    secant=lambda ua, fa, ub, fb=None, owned=False, fb_owned=False, alpha=1.0: _exp_linear_secant(
        ua, ub, owned, fb, fb_owned, alpha, 1.0, 1.0 / alpha),
    vjp=lambda g, u, y, alpha=1.0: aten.elu_backward(g, alpha, 1.0, 1.0 / alpha, False, u),
    grad_secant=lambda g, ua, fa, ub, fb, out, alpha=1.0: kernels.exp_linear_secant(ua, ub, alpha, 1.0, 1.0 / alpha, out=out, grad=g),
    secant_forms_fb=kernels.fits,
    record_forward=lambda u, alpha=1.0: kernels.exp_linear(u, alpha, 1.0, 1.0 / alpha),
)
register_activation(
    "gelu",
    lambda u, approximate="none": F.gelu(u, approximate=approximate),
    lambda u, approximate="none": aten.gelu_backward(_ones(u), u, approximate=approximate),
    [CallForm(F.gelu, ("approximate",))],
    defaults={"approximate": "none"},
    vjp=lambda g, u, y, approximate="none": aten.gelu_backward(g, u, approximate=approximate),
)
register_activation(
    "silu",
    F.silu,
    lambda u: aten.silu_backward(_ones(u), u),
    [CallForm(F.silu, (), "inplace")],
    vjp=lambda g, u, y: aten.silu_backward(g, u),
)
register_activation(
    "mish",
    F.mish,
    lambda u: aten.mish_backward(_ones(u), u),
    [CallForm(F.mish, (), "inplace")],
    vjp=lambda g, u, y: aten.mish_backward(g, u),
)
def _sigmoid_derivative(u: Tensor) -> Tensor:
    return aten.sigmoid_backward(_ones(u), torch.sigmoid(u))


def _sigmoid_secant(ua: Tensor, fa: Tensor | None, ub: Tensor, fb: Tensor | None = None, owned: bool = False,
                    fb_owned: bool = False) -> Tensor:
    """σ(b) − σ(a) = (σ(a)·σ(−b) + σ(b)·σ(−a))·tanh(d/2) with ``d = b − a`` (from σ = (1 +
    tanh(·/2))/2 and the tanh identity): every term positive and computed directly, so no
    cancellation — the plain quotient loses eps/|d|, and in saturation 1 − σ(u) loses all
    precision. Only ``d = 0`` is 0/0: the derivative is taken there. A block at a time, or one
    fused pass where :func:`ttadapt.kernels.sigmoid_secant` applies."""
    if fa is None:
        fa = torch.sigmoid(ua)
    if fb is None:
        fb, fb_owned = torch.sigmoid(ub), True
    fused = kernels.sigmoid_secant(ua, fa, ub, fb, out=_writable_out(ub, owned, fb, fb_owned))
    if fused is not None:
        return fused
    return _sigmoid_secant_torch(ua, fa, ub, fb, owned, fb_owned)


def _sigmoid_secant_torch(ua: Tensor, fa: Tensor, ub: Tensor, fb: Tensor, owned: bool = False,
                          fb_owned: bool = False) -> Tensor:
    """:func:`_sigmoid_secant` in PyTorch ops (any device and dtype)."""

    def step(out: Tensor, ua: Tensor, ub: Tensor, fa: Tensor, fb: Tensor) -> None:
        x = torch.sigmoid(ub.neg()).mul_(fa).addcmul_(fb, torch.sigmoid(ua.neg()))  # σa·σ(−b) + σb·σ(−a)
        d = ub.sub_(ua) if owned else ub - ua
        torch.mul(x, torch.mul(d, 0.5).tanh_().div_(d), out=out)  # fb (may be out) is read above

    return _blockwise_secant(step, _sigmoid_derivative, ua, ub, fb, fb_owned, fa, fb)


register_activation(
    "sigmoid",
    torch.sigmoid,
    _sigmoid_derivative,
    _forms([torch.sigmoid, F.sigmoid, torch.special.expit, *_method("sigmoid")], [torch.sigmoid_, *_method("sigmoid_")]),
    secant=_sigmoid_secant,
    vjp=lambda g, u, y: aten.sigmoid_backward(g, y),
    checked_secant=kernels.sigmoid_secant_checked,
)
_ONES: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _one(like: Tensor) -> Tensor:
    """A cached 0-d tensor holding 1 with ``like``'s dtype and device (read-only by convention)."""
    key = (like.dtype, like.device)
    one = _ONES.get(key)
    if one is None:
        one = _ONES[key] = like.new_ones(())
    return one


def _tanh_secant(ua: Tensor, fa: Tensor | None, ub: Tensor, fb: Tensor | None = None, owned: bool = False,
                 fb_owned: bool = False) -> Tensor:
    """tanh(b) − tanh(a) = (1 − tanh a·tanh b)·tanh(b − a): no cancellation, and tanh(d)/d → 1
    as d → 0 (0/0 at d == 0 exactly, where the slope is 1 − tanh²a, the derivative).

    ``fb = tanh(ub)`` when the other pass kept it (the fused kernel forms it itself otherwise);
    ``owned`` / ``fb_owned``: ``ub`` / ``fb`` may be overwritten (then no new tensor is
    allocated). One fused pass where :func:`ttadapt.kernels.tanh_secant` applies, else
    :func:`_tanh_secant_torch`."""
    if fa is None:
        fa = torch.tanh(ua)
    out = fb if (fb is not None and fb_owned) else ub if owned else None
    fused = kernels.tanh_secant(ua, fa, ub, fb, out=out)
    if fused is not None:
        return fused
    if fb is None:
        fb, fb_owned = torch.tanh(ub), True
    return _tanh_secant_torch(ua, fa, ub, fb, owned, fb_owned)


def _tanh_secant_torch(ua: Tensor, fa: Tensor, ub: Tensor, fb: Tensor, owned: bool = False,
                       fb_owned: bool = False) -> Tensor:
    """:func:`_tanh_secant` in PyTorch ops (any device and dtype; six elementwise passes)."""
    # 1 − tanh a·tanh b by addcmul: rounded as ATen's tanh_backward rounds 1 − y², so that at
    # ub == ua the slope is the ordinary derivative bit for bit
    cosh_factor = torch.addcmul(_one(fa), fa, fb, value=-1.0, out=fb if fb_owned else None)
    d = ub.sub_(ua) if owned else ub - ua
    return torch.tanh(d).div_(d).nan_to_num_(nan=1.0).mul_(cosh_factor)


register_activation(
    "tanh",
    torch.tanh,
    lambda u: aten.tanh_backward(_ones(u), torch.tanh(u)),
    _forms([torch.tanh, F.tanh, *_method("tanh")], [torch.tanh_, *_method("tanh_")]),
    secant=_tanh_secant,
    vjp=lambda g, u, y: aten.tanh_backward(g, y),
    grad_secant=lambda g, ua, fa, ub, fb, out: None if fa is None else kernels.tanh_secant(ua, fa, ub, fb, out=out, grad=g),
    secant_forms_fb=kernels.fits,
    checked_secant=kernels.tanh_secant_checked,
    record_forward=lambda u: kernels.tanh(u),
)
register_activation(
    "softplus",
    lambda u, beta=1.0, threshold=20.0: F.softplus(u, beta, threshold),
    lambda u, beta=1.0, threshold=20.0: aten.softplus_backward(_ones(u), u, beta, threshold),
    [CallForm(F.softplus, ("beta", "threshold"))],
    defaults={"beta": 1.0, "threshold": 20.0},
    vjp=lambda g, u, y, beta=1.0, threshold=20.0: aten.softplus_backward(g, u, beta, threshold),
)
register_activation(
    "softsign",
    F.softsign,
    lambda u: (1.0 + u.abs()).reciprocal().square(),
    [CallForm(F.softsign)],
    kinks=lambda: (0.0,),  # f' has a corner at 0
)
register_activation(
    "hardtanh",
    lambda u, min_val=-1.0, max_val=1.0: F.hardtanh(u, min_val, max_val),
    lambda u, min_val=-1.0, max_val=1.0: aten.hardtanh_backward(_ones(u), u, min_val, max_val),
    [CallForm(F.hardtanh, ("min_val", "max_val"), "inplace"), CallForm(F.hardtanh_, ("min_val", "max_val"), True)],
    defaults={"min_val": -1.0, "max_val": 1.0},
    kinks=lambda min_val=-1.0, max_val=1.0: (min_val, max_val),
    clamp=lambda min_val=-1.0, max_val=1.0: (min_val, max_val),
    vjp=lambda g, u, y, min_val=-1.0, max_val=1.0: aten.hardtanh_backward(g, u, min_val, max_val),
)
register_activation(
    "hardswish",
    F.hardswish,
    lambda u: aten.hardswish_backward(_ones(u), u),
    [CallForm(F.hardswish, (), "inplace")],
    kinks=lambda: (-3.0, 3.0),
    vjp=lambda g, u, y: aten.hardswish_backward(g, u),
)
register_activation(
    "hardsigmoid",
    F.hardsigmoid,
    lambda u: aten.hardsigmoid_backward(_ones(u), u),
    [CallForm(F.hardsigmoid, (), "inplace")],
    kinks=lambda: (-3.0, 3.0),
    vjp=lambda g, u, y: aten.hardsigmoid_backward(g, u),
)
register_activation(
    "logsigmoid",
    F.logsigmoid,
    lambda u: torch.sigmoid(-u),
    [CallForm(F.logsigmoid)],
)
register_activation(
    "tanhshrink",
    F.tanhshrink,
    lambda u: torch.tanh(u).square(),
    [CallForm(F.tanhshrink)],
)
register_activation(
    "softshrink",
    lambda u, lambd=0.5: F.softshrink(u, lambd),
    lambda u, lambd=0.5: aten.softshrink_backward(_ones(u), u, lambd),
    [CallForm(F.softshrink, ("lambd",))],
    defaults={"lambd": 0.5},
    kinks=lambda lambd=0.5: (-lambd, lambd),
    vjp=lambda g, u, y, lambd=0.5: aten.softshrink_backward(g, u, lambd),
)

# Nonlinear calls that are *not* averaged. `inspect` lists them so that a user sees what keeps
# its ordinary derivative: math inside normalisations and losses (exp, rsqrt, pow),
# discontinuous or random activations (threshold, hardshrink, rrelu) whose secant is not the
# mean of the ordinary derivative, recurrent layers' fused gates where they stay fused.
UNAVERAGED_POINTWISE: dict[Any, str] = {}
for _name in (
    "exp", "exp2", "expm1", "log", "log1p", "log2", "log10", "sqrt", "rsqrt", "pow", "square", "abs",
    "reciprocal", "erf", "erfc", "erfinv", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh",
    "asinh", "acosh", "atanh", "clamp", "clip", "clamp_min", "clamp_max", "sign", "logit", "rrelu",
    "hardshrink", "threshold",
    # aliases, binary nonlinear maps, and the piecewise-constant roundings (derivative 0, while a
    # secant across a step is not)
    "arcsin", "arccos", "arctan", "arcsinh", "arccosh", "arctanh", "sgn", "maximum", "minimum", "fmax",
    "fmin", "atan2", "arctan2", "hypot", "logaddexp", "logaddexp2", "float_power", "xlogy", "lgamma",
    "digamma", "polygamma", "mvlgamma", "i0", "sinc", "nan_to_num", "heaviside", "fmod", "remainder", "floor",
    "ceil", "round", "trunc", "fix", "frac",
):
    for _owner in (torch, torch.Tensor):
        for _suffix in ("", "_"):
            _f = getattr(_owner, _name + _suffix, None)
            if _f is not None:
                UNAVERAGED_POINTWISE[_f] = _name
for _f, _name in ((F.threshold, "threshold"), (F.hardshrink, "hardshrink"), (F.rrelu, "rrelu"), (F.glu, "glu")):
    UNAVERAGED_POINTWISE[_f] = _name
for _name in getattr(torch.special, "__all__", ()):  # torch.special's pointwise functions (expit is sigmoid)
    _f = getattr(torch.special, _name, None)
    if callable(_f) and _name not in ("softmax", "log_softmax", "logsumexp") and lookup_call(_f) is None:
        UNAVERAGED_POINTWISE.setdefault(_f, f"special.{_name}")
# Comparisons of a value that depends on trainable parameters make a mask, the branch of a
# hand-written piecewise function (`h * (h > 0)`, `torch.where(h > 0, h, 0.1 * h)`,
# `h.masked_fill(h < 0, 0)`), which keeps its ordinary derivative; and the binary forms of max /
# min are maximum / minimum. `inspect` lists these only where that value requires a gradient
# (a mask built from constants, such as an attention mask, is no nonlinearity of the parameters).
MASKING_CALLS: dict[Any, str] = {}
for _name in ("gt", "lt", "ge", "le", "greater", "less", "greater_equal", "less_equal"):
    for _owner in (torch, torch.Tensor):
        _f = getattr(_owner, _name, None)
        if _f is not None:
            MASKING_CALLS[_f] = f"{_name} (mask)"
for _op, _name in (("__gt__", "gt"), ("__lt__", "lt"), ("__ge__", "ge"), ("__le__", "le")):
    MASKING_CALLS[getattr(torch.Tensor, _op)] = f"{_name} (mask)"
BINARY_EXTREMA: dict[Any, str] = {torch.max: "max", torch.Tensor.max: "max", torch.min: "min", torch.Tensor.min: "min"}
# Recurrent layers (nn.LSTM, nn.GRU, nn.RNN and their cells) run their sigmoid / tanh / ReLU
# gates inside one fused ATen call. The passes take it apart (ttadapt.recurrent), each gate a
# site; where they cannot (under autocast), the fused call keeps its gates' ordinary
# derivative and is listed under these names.
for _name in ("lstm", "gru", "rnn_tanh", "rnn_relu", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell"):
    _f = getattr(torch, _name, None)
    if _f is not None:
        UNAVERAGED_POINTWISE[_f] = f"{_name} (fused gates)"


# --------------------------------------------------------------------------------------------
# Hugging Face transformers activation classes, registered by module class once transformers
# is in use (importing it costs seconds, so ttadapt does not do it up front: a model made of its
# classes has imported it already). Their derivative comes from autograd through the module's own forward, which is
# exactly what the ordinary backward computes.
# --------------------------------------------------------------------------------------------
_TRANSFORMERS_DONE = False


def _ensure_transformers(import_it: bool) -> None:
    global _TRANSFORMERS_DONE
    if _TRANSFORMERS_DONE or (not import_it and "transformers" not in sys.modules):
        return
    _TRANSFORMERS_DONE = True
    _register_transformers()


def _register_transformers() -> None:
    try:
        import transformers.activations as hf
    except Exception:  # transformers absent or broken: nothing to register
        return
    for cls_name in (
        "GELUActivation", "NewGELUActivation", "FastGELUActivation", "QuickGELUActivation",
        "ClippedGELUActivation", "AccurateGELUActivation", "GELUTanh", "PytorchGELUTanh",
        "SiLUActivation", "MishActivation", "LaplaceActivation", "ReLUSquaredActivation",
        "SqrtSoftplusActivation", "XIELUActivation",
    ):
        cls = getattr(hf, cls_name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module) and cls not in _MODULE_ACTIVATIONS:
            kinks = None
            if cls_name == "ClippedGELUActivation":
                kinks = _clipped_gelu_kinks
            elif cls_name == "ReLUSquaredActivation":
                kinks = lambda module: (0.0,)  # noqa: E731
            elif cls_name == "XIELUActivation":  # branches meet at 0; min(x, eps) bends at eps
                kinks = lambda module: (float(module.eps), 0.0)  # noqa: E731
            register_module_activation(f"transformers.{cls_name}", cls, kinks=kinks)


def _clipped_gelu_kinks(module: nn.Module) -> tuple[float, ...]:
    """Inputs where GELU crosses the clip bounds: sign changes on a grid, refined by bisection."""

    def gelu(x: float) -> float:
        return 0.5 * x * (1 + math.erf(x / math.sqrt(2)))

    out = []
    for bound in (module.min, module.max):
        grid = [-12.0 + 0.01 * i for i in range(int((abs(bound) + 24) / 0.01))]
        for lo, hi in zip(grid[:-1], grid[1:]):
            if (gelu(lo) - bound) * (gelu(hi) - bound) < 0:
                for _ in range(100):
                    mid = 0.5 * (lo + hi)
                    if (gelu(lo) - bound) * (gelu(mid) - bound) <= 0:
                        hi = mid
                    else:
                        lo = mid
                out.append(0.5 * (lo + hi))
    return tuple(sorted(out))
