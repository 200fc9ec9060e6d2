"""Finding and pairing activation sites across the two forward passes.

A *site* is one call of a registered activation (or, for the Linear variant, of an affine
layer) during a forward pass. Sites are seen by a ``TorchFunctionMode`` — which catches module,
functional and in-place calls alike (``nn.ReLU``, ``F.relu``, ``x.relu_()``) — and, for
activations registered by module class, by patching those modules' ``forward`` for the duration
of a pass. A module called three times (torchvision's Bottleneck reuses ``self.relu``) gives
three sites. A model built only of ``nn.Sequential`` containers, plain leaves (Linear, Conv,
Flatten, normalisation, dropout, average pooling), standard activation modules and
``nn.MaxPool2d``, with no hooks, runs its record, apply and graph passes without the mode: its
activation and pooling modules are patched to handle their one call directly (the mode's
dispatch costs every call of the model several µs; :meth:`SiteSession._direct_modules`). In
other models the plain leaves run with the mode taken off the stack
(:meth:`SiteSession._leaves_without_mode`).

:class:`SiteSession` runs in one of three phases:

* ``"record"`` — the pass at the *other* state, without a graph: each site's input (and for
  PReLU / affine layers the other state's weight) is kept, and an activation's output by
  reference too (so the secant need not evaluate f there again; if the model modifies that
  output in place later, the version counter shows it and f is recomputed) — for clamp-like
  activations not when ``"graph"`` slots are waiting (the deferred schedule, where they would
  raise the peak memory for one cheap pass), and not where the activation's secant does
  without it (``Activation.secant_forms_fb``: the fused kernels of tanh and the ELU family).
  An activation with a ``record_forward`` (the ELU family and tanh: vectorised CPU kernels,
  2.5–3 times as fast as ATen's, within a few ulps of it) computes its output there with that: this
  pass's outputs feed nothing but the other state's own pre-activations;
* ``"apply"`` — the pass at the graph state: each site is paired, in call order, with the
  recorded one (same name, shape, dtype — else :class:`SiteMismatchError`) and given the
  averaged backward of :mod:`ttadapt.secant` (a native product on small sites, an autograd
  function otherwise);
* ``"inspect"`` — one plain pass that lists every pointwise call and whether it is averaged;
* ``"graph"`` — the pass at the graph state *before* the other state is known (AG-1 / AG-2):
  each site gets a :class:`~ttadapt.deferred.DeferredSlot` and a function whose backward is
  ordinary until :meth:`SiteSession.fill_slots` hands it a later record pass's inputs.

Code that computes activations out of this module's sight (``torch.compile``, checkpointing,
custom ``autograd.Function`` s, TorchScript, ATen ops called directly) is dealt with in
:mod:`ttadapt.unseen`. Recurrent layers' fused calls (``torch.lstm``, ...) are taken apart by
:mod:`ttadapt.recurrent`, their gates sites like any other.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _nn_module
from torch.overrides import TorchFunctionMode

from . import kernels, recurrent, secant, unseen
from .recurrent_sequence import Projection
from .activations import (BINARY_EXTREMA, MASKING_CALLS, UNAVERAGED_POINTWISE, Activation, CallForm, ModuleActivation,
                          lookup_call, lookup_module, registry_version)
from .pooling import MAX_POOL2D_CALLS as _MAX_POOL2D, max_pool2d_call
from .states import ModelLayout
from .unseen import RecomputedActivationsError
from .deferred import (DeferredActivation, DeferredAffine, DeferredModule, DeferredPassThrough, DeferredPReLU, DeferredSlot,
                       hook_native_site, native_site, single_node_call)
from .secant import (AveragedAffine, SecantModule, SecantPassThrough, SecantPReLU, activation_callables,
                     averaged_activation_output, bind_settings, secant_product, secant_slope)

__all__ = ["SiteMismatchError", "RecomputedActivationsError", "SiteSession", "SiteCall"]


class SiteMismatchError(RuntimeError):
    """The two forward passes did not call the same activation sites in the same order."""


_F32 = torch.float32

# Module classes whose forward is one registered activation call, as torch's source writes it:
# class -> (module, input) -> (func, args, kwargs). In a model built of these, containers and
# _PLAIN_LEAVES only, a pass needs no function mode (see SiteSession._direct_modules).
_DIRECT_ACTIVATIONS: dict[type, Callable[[nn.Module, Tensor], tuple[Callable, tuple, dict]]] = {
    nn.Tanh: lambda m, x: (torch.tanh, (x,), {}),
    nn.Sigmoid: lambda m, x: (torch.sigmoid, (x,), {}),
    nn.ELU: lambda m, x: (F.elu, (x, m.alpha, m.inplace), {}),
    nn.ReLU: lambda m, x: (F.relu, (x,), {"inplace": m.inplace}),
    nn.LeakyReLU: lambda m, x: (F.leaky_relu, (x, m.negative_slope, m.inplace), {}),
    nn.GELU: lambda m, x: (F.gelu, (x,), {"approximate": m.approximate}),
    nn.SiLU: lambda m, x: (F.silu, (x,), {"inplace": m.inplace}),
}
# Leaf module classes whose forward makes no site and calls no other module (the Linear variant
# averages Linear and Conv: then the mode is used).
_PLAIN_LEAVES = frozenset({
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.BatchNorm1d,
    nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
})
_CONTAINER_FORWARDS = frozenset({nn.Sequential.forward})
_DIRECT_BY_FORWARD = {cls.forward: call for cls, call in _DIRECT_ACTIVATIONS.items()}  # (subclasses keep forward)
_AFFINE: dict[Any, str] = {F.linear: "linear", F.conv1d: "conv1d", F.conv2d: "conv2d", F.conv3d: "conv3d"}


@dataclass
class _Record:
    """What the pass at the other state left for one site."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    u: Tensor
    version: int | None  # the input's version counter when kept by reference; None for a copy
    weight: Tensor | None = None  # PReLU slope / affine weight at the other state
    out: Tensor | None = None  # smooth activations: the output f(u) there, kept by reference
    out_version: int | None = None

    def kept_output(self) -> tuple[Tensor | None, bool]:
        """``(f(u), may be overwritten)``; ``(None, False)`` if none was kept or it has been
        modified in place since (then the secant recomputes it)."""
        if self.out is None or self.out._version != self.out_version:
            return None, False
        return self.out, _sole_owner(self.out)


@dataclass
class SiteCall:
    """One pointwise (or, with ``linear=True``, affine) call seen by :func:`ttadapt.inspect`."""

    module: str  # module path ("" for the model itself)
    call: str  # activation or function name
    averaged: bool
    shape: tuple[int, ...]
    inplace: bool = False
    grad_off: bool = False  # called with gradient recording off: inside a custom autograd.Function or no_grad


def _storage_key(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)
# Reusing a kept tensor's memory saves an allocation; below this size that is not worth a check.
_OWN_MIN_BYTES = 1 << 16
# Sites at least this large take their activation's record_forward in the pass at `other`, if it
# has one (below, the kernel call's fixed cost is more than the call it replaces saves)
RECORD_FORWARD_MIN = 4096


def _sole_owner(t: Tensor) -> bool:
    """Whether ``t`` is the only tensor on its memory (then the engine may overwrite it).

    A kept input is usually an intermediate of the finished pass at `other`; one that aliases the
    caller's data (the batch, a parameter, a view) has other owners and is never overwritten.
    """
    if t.numel() * t.element_size() < _OWN_MIN_BYTES or _USE_COUNT is None or t._base is not None:
        return False
    storage = t.untyped_storage()
    return _USE_COUNT(storage._cdata) == 2 and storage.nbytes() == t.numel() * t.element_size()  # t + `storage`


def _check_pair(k: int, rec: _Record, name: str, shape: torch.Size, dtype: torch.dtype) -> None:
    """Site ``k`` of the pass at the graph state must match site ``k`` recorded at `other`."""
    if rec.name != name or rec.shape != shape or rec.dtype != dtype:
        raise SiteMismatchError(
            f"averaged call #{k + 1} differs between the passes: {rec.name} with input "
            f"{tuple(rec.shape)} {rec.dtype} at `other`, {name} with input {tuple(shape)} "
            f"{dtype} at the current parameters. Both passes must follow the same control flow."
        )
    if rec.version is not None and rec.u._version != rec.version:
        raise RuntimeError(
            f"the input of averaged call #{k + 1} ({name}) was modified in place after the call "
            "during the pass at `other`; ttadapt keeps that input by reference. Avoid in-place "
            "operations on activation inputs after the activation."
        )


def _small_dense(u: Tensor, ub: Tensor, fb: Tensor | None) -> bool:
    """Whether a site of the pass at the graph state takes :func:`_small_site`: plain contiguous
    float32 CPU tensors under ``kernels.PARALLEL_MIN`` elements and no more than
    ``secant.PRODUCT_MAX`` (same shape and dtype: checked by the pairing), a graph being built,
    the kernels loaded, no torch.func transform."""
    n = u.numel()
    return (type(u) is Tensor and u.dtype is _F32 and u.is_cpu and n < kernels.PARALLEL_MIN and n <= secant.PRODUCT_MAX
            and u.is_contiguous() and ub.is_contiguous() and ub.is_cpu and (fb is None or (fb.is_contiguous() and fb.is_cpu))
            and torch.is_grad_enabled() and kernels.loaded() and not torch._C._are_functorch_transforms_active())


def _small_site(checked: Callable, act: Activation, func: Callable, args: tuple, kwargs: dict, u: Tensor, ub: Tensor,
                fb: Tensor | None, fb_owned: bool) -> Tensor:
    """A small site of the pass at the graph state by the shortest route: the model's call and the
    kernel's slope under no_grad, joined by :func:`~ttadapt.secant.secant_product` — what
    :func:`~ttadapt.secant.averaged_activation_output` computes, without its general checks and
    layers, which on sites of a few thousand elements cost more than the arithmetic (Model B's
    tanh sites)."""
    torch._C._set_grad_enabled(False)
    try:
        y = func(*args, **kwargs)
        if type(y) is Tensor and y.shape == u.shape and y.dtype is _F32 and y.is_contiguous():
            slope = torch.empty_like(u)
            checked(u, y, ub, fb, slope)
            done = True
        else:  # (not met by the registered activations)
            done = False
    finally:
        torch._C._set_grad_enabled(True)
    if done:
        return secant_product(u, y, slope)
    return averaged_activation_output(act, lambda _u: y, u, ub, {}, False, False, fb, fb_owned)  # (y computed once)


class _Mode(TorchFunctionMode):
    def __init__(self, session: "SiteSession") -> None:
        super().__init__()
        self.session = session

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        s = self.session
        if s.opaque:
            return func(*args, **kwargs)
        hit = lookup_call(func)
        if hit is not None:
            return s._on_activation(func, hit[0], hit[1], args, kwargs)
        if s.linear:
            kind = _AFFINE.get(func) if _hashable(func) else None
            if kind is not None:
                return s._on_affine(func, kind, args, kwargs)
        if recurrent.fused_kind(func) is not None:
            out = s._on_recurrent(func, args, kwargs)
            if out is not NotImplemented:
                return out
            if s.phase != "inspect":
                unseen.warn_fused_recurrent(func.__name__)
        if s.phase == "inspect" and _hashable(func):
            if func in UNAVERAGED_POINTWISE:
                s._log_unaveraged(func, args, kwargs)
            elif func in MASKING_CALLS or func in BINARY_EXTREMA:
                s._log_masking(func, args, kwargs)
        if type(func) in unseen.ATEN_OPS:
            s._aten_op(func, args, kwargs)
        elif s.phase != "inspect" and (func is _MAX_POOL2D[0] or func is _MAX_POOL2D[1]):
            out = max_pool2d_call(args, kwargs)  # the same values (and gradient), faster: see pooling.py
            if out is not None:
                return out
        return func(*args, **kwargs)


_stack_len = torch._C._len_torch_function_stack
_stack_at = torch._C._get_function_stack_at
_pop_mode = torch._C._pop_torch_function_stack
_push_mode = torch._C._push_on_torch_function_stack


def _without_mode(forward: Callable) -> Callable:
    """``forward`` of a :data:`_PLAIN_LEAVES` module, run with the session's function mode taken
    off the stack while it runs (put back after, also on an error): such a forward makes no site
    and calls no ATen op or pooling the mode handles, and the mode's dispatch costs each of its
    calls 2–20 µs (BatchNorm's, whose functional form dispatches in Python, most)."""

    def run(*args: Any, **kwargs: Any):
        n = _stack_len()
        if n and type(_stack_at(n - 1)) is _Mode:
            mode = _pop_mode()
            try:
                return forward(*args, **kwargs)
            finally:
                _push_mode(mode)
        return forward(*args, **kwargs)

    return run


def _global_hooks() -> bool:
    """Whether global module hooks are registered (they may call anything: the mode must see it)."""
    return bool(_nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks
                or getattr(_nn_module, "_global_forward_hooks_always_called", None))


def _hashable(func: Any) -> bool:
    try:
        hash(func)
    except TypeError:
        return False
    return True


def _direct_plan(layout: ModelLayout) -> list[tuple[nn.Module, Callable | None, Any]] | None:
    """The activation modules (with their call and its registered activation) and
    ``nn.MaxPool2d`` modules (call None) of a model that :meth:`SiteSession._direct_modules` may
    run without the function mode, or None where a module of another kind (or one registered as
    a whole-module site) is in it. By class only: worked out once per layout (both passes of a
    step share one) and registry version; hooks are the caller's to check on every pass."""
    key = registry_version()
    memo = layout.memo
    if memo.get("direct plan key") == key:
        return memo["direct plan"]  # type: ignore[return-value]
    plan: list[tuple[nn.Module, Callable | None, Any]] | None = []
    for path, module in layout.modules:
        cls = type(module)
        if lookup_module(module) is not None or isinstance(module, torch.jit.ScriptModule):
            plan = None  # (a class registered as a whole-module site; TorchScript, whose forward is no Python function)
            break
        if cls.forward in _CONTAINER_FORWARDS or cls in _PLAIN_LEAVES:
            continue
        call = _DIRECT_BY_FORWARD.get(cls.forward)
        if call is not None:
            plan.append((module, call, lookup_call(call(module, None)[0])))
        elif cls.forward is nn.MaxPool2d.forward:
            plan.append((module, None, None))
        else:
            plan = None
            break
    memo["direct plan key"], memo["direct plan"] = key, plan
    return plan


class SiteSession:
    """One forward pass with activation sites intercepted (see the module docstring)."""

    def __init__(self, linear: bool = False, track_modules: bool = False) -> None:
        self.linear = linear
        self.track_modules = track_modules
        self.phase = "record"
        self.records: list[_Record | None] = []
        self.cursor = 0
        self.opaque = 0
        self.calls: list[SiteCall] = []
        self.recorded_bytes = 0  # what the last record phase kept (see stored_bytes)
        self.slots: list[DeferredSlot] = []  # the "graph" phase's sites
        self.rescale = False  # "graph" phase: affine slots record ordinary norms (AG-2 Linear)
        self._stack: list[str] = []
        self._by_storage: dict[int, list[int]] = {}  # kept inputs by memory, filled when an in-place call needs it
        self._unkeyed: list[int] = []  # records kept by reference since, not yet in _by_storage

    # -- memory accounting ------------------------------------------------------------------
    @property
    def stored_bytes(self) -> int:
        """Bytes held for the pass at the other state: the recorded site inputs."""
        return sum(r.u.numel() * r.u.element_size() for r in self.records if r is not None)

    # -- running a pass ---------------------------------------------------------------------
    @contextlib.contextmanager
    def run(self, model: nn.Module, phase: str, layout: ModelLayout | None = None) -> Iterator["SiteSession"]:
        """Intercept sites of ``model`` during the ``with`` body, in ``phase``."""
        if phase not in ("record", "apply", "inspect", "graph"):
            raise ValueError(f"unknown phase {phase!r}")
        self.phase = phase
        if phase == "graph":
            self.slots = []
        self.cursor = 0
        self.model_calls = 0
        self.grad_off_sites = False  # (a site met with grad mode off: maybe a reentrant checkpoint)
        layout = layout or ModelLayout(model)
        self._scripted(layout)
        direct = self._direct_modules(layout)
        patched = self._patch_modules(layout) if direct is None else direct
        if direct is None:
            patched.extend(self._leaves_without_mode(layout))
        patched.append(self._patch_root(model, mode=direct is None))
        hooks: list = []
        try:
            if self.track_modules:
                self._track(model, hooks)
            with unseen.eager():
                yield self
            if phase == "record":
                self.recorded_bytes = self.stored_bytes
            if self.model_calls == 0:
                raise RuntimeError(
                    "the closure never called the model (model(...)); ttadapt averages the activations "
                    "of calls to the model it was given"
                )
        finally:
            for h in hooks:
                h.remove()
            for module, had, old in reversed(patched):
                if had:
                    module.__dict__["forward"] = old
                else:
                    module.__dict__.pop("forward", None)
            self._stack.clear()
            self._by_storage.clear()
            self._unkeyed.clear()

    def _scripted(self, layout: ModelLayout) -> None:
        """TorchScript modules calling activations: listed by ``inspect`` as not averaged, warned
        about by the averaged passes (:mod:`ttadapt.unseen`)."""
        for path, ops in unseen.script_activations(layout):
            if self.phase == "inspect":
                self.calls.extend(SiteCall(path, f"{op} (TorchScript)", False, ()) for op in ops)
            else:
                unseen.warn_scripted(path, ops)

    def check_graph(self, loss: Tensor) -> None:
        """After a pass at the graph state: where activations ran with gradient recording off,
        :func:`ttadapt.unseen.check_graph` finds out why (a reentrant checkpoint is refused, a
        custom ``autograd.Function`` warned about)."""
        if self.grad_off_sites and isinstance(loss, Tensor):
            unseen.check_graph(loss)

    def _graph_site(self) -> None:
        """A site of a pass at the graph state: refuse a non-reentrant checkpoint around it; note
        one that runs with grad mode off (see :meth:`check_graph`)."""
        if unseen.under_checkpoint():
            raise RecomputedActivationsError(unseen.RECOMPUTED)
        if not torch.is_grad_enabled():
            self.grad_off_sites = True

    def finish_apply(self) -> None:
        """Check that the pass at the graph state used every recorded site."""
        left = len(self.records) - self.cursor
        if left:
            nxt = self.records[self.cursor]
            raise SiteMismatchError(
                f"the pass at the current parameters made {self.cursor} averaged calls, the pass at "
                f"`other` made {len(self.records)}; the first one left over is {nxt.name} with input "
                f"shape {tuple(nxt.shape)}. Both passes must follow the same control flow."
            )
        self.records.clear()

    def fill_slots(self) -> None:
        """Hand the last record pass's inputs to the ``"graph"`` pass's slots, in call order."""
        records, slots = self.records, self.slots
        if len(records) != len(slots):
            raise SiteMismatchError(
                f"the pass at the current parameters made {len(slots)} averaged calls, the pass at "
                f"`other` made {len(records)}. Both passes must follow the same control flow."
            )
        for k, (rec, slot) in enumerate(zip(records, slots)):
            assert rec is not None
            _check_pair(k, rec, slot.name, slot.shape, slot.dtype)
            slot.ub, slot.weight = rec.u, rec.weight
            slot.fb = rec.kept_output()[0]
            if slot.native is not None:
                hook_native_site(slot)
        self.records = []

    def _slot(self, name: str, u: Tensor) -> DeferredSlot:
        slot = DeferredSlot(name, u.shape, u.dtype, rescale=self.rescale)
        self.slots.append(slot)
        return slot

    def _direct_modules(self, layout: ModelLayout) -> list | None:
        """For a model built only of Sequential containers, :data:`_PLAIN_LEAVES`, activation
        modules of :data:`_DIRECT_ACTIVATIONS` and ``nn.MaxPool2d`` (Model B), without hooks: patch
        the activation and pooling modules to handle their call directly and return the patches
        — the pass then runs without the function mode, whose dispatch costs every call of the
        model several µs. None where anything else is in the model (the mode sees every call)."""
        if self.phase == "inspect" or self.linear or self.track_modules or _global_hooks():
            return None
        plan = _direct_plan(layout)
        if plan is None:
            return None
        for path, module in layout.modules:  # (hooks and instance forwards may come and go between passes)
            d = module.__dict__
            if d.get("_forward_hooks") or d.get("_forward_pre_hooks") or "forward" in d:
                return None
        for module, call, hit in plan:
            # (the instance dict directly: what nn.Module.__setattr__ does for a plain attribute,
            # without its checks, which cost µs per module and pass)
            module.__dict__["forward"] = self._direct_pool(module) if call is None else self._direct_site(module, call, hit)
        return [(module, False, None) for module, _, _ in plan]

    def _leaves_without_mode(self, layout: ModelLayout) -> list:
        """In a pass with the function mode: patch the :data:`_PLAIN_LEAVES` modules (by exact
        class, no instance ``forward``) to run without it (:func:`_without_mode`) and return the
        patches. Not for ``inspect`` (which lists what the leaves call), the Linear variant
        (whose sites are the affine leaves' calls) or module tracking."""
        if self.phase == "inspect" or self.linear or self.track_modules:
            return []
        leaves = layout.memo.get("plain leaves")
        if leaves is None:  # (by class: worked out once per layout)
            leaves = layout.memo["plain leaves"] = [m for _, m in layout.modules if type(m) in _PLAIN_LEAVES]
        patched = []
        for module in leaves:
            d = module.__dict__
            if "forward" not in d:  # (an instance forward may come and go between passes)
                d["forward"] = _without_mode(module.forward)
                patched.append((module, False, None))
        return patched

    def _direct_site(self, module: nn.Module, call: Callable, hit: Any) -> Callable:
        def site_forward(input: Tensor) -> Tensor:
            func, args, kwargs = call(module, input)
            if hit is None or self.opaque:
                return func(*args, **kwargs)
            return self._on_activation(func, hit[0], hit[1], args, kwargs)

        return site_forward

    def _direct_pool(self, module: nn.Module) -> Callable:
        forward = module.forward

        def pool_forward(input: Tensor) -> Tensor:
            out = max_pool2d_call((input, module.kernel_size, module.stride, module.padding, module.dilation),
                                  {"ceil_mode": module.ceil_mode, "return_indices": module.return_indices})
            return forward(input) if out is None else out

        return pool_forward

    def _patch_root(self, model: nn.Module, mode: bool = True) -> tuple:
        """Intercept only while the model itself runs: the loss outside it keeps its own backward."""
        had = "forward" in model.__dict__
        old = model.__dict__.get("forward")
        forward = model.forward

        def intercepted(*args: Any, **kwargs: Any):
            self.model_calls += 1
            if self.opaque or not mode:
                return forward(*args, **kwargs)
            with _Mode(self):
                return forward(*args, **kwargs)

        model.__dict__["forward"] = intercepted  # (not setattr: a ScriptModule's would rewrite its compiled forward)
        return (model, had, old)

    # -- module bookkeeping -----------------------------------------------------------------
    def _track(self, model: nn.Module, hooks: list) -> None:
        """Keep :attr:`_stack` (the module path of each call) with hooks, put into ``hooks``."""
        def enter(name: str) -> Callable:
            def pre_hook(module: nn.Module, args: Any) -> None:
                self._stack.append(name)

            return pre_hook

        def leave(module: nn.Module, args: Any, output: Any) -> None:
            if self._stack:
                self._stack.pop()

        named = list(model.named_modules())
        scripted = [path for path, _ in unseen.script_roots(named)]
        for name, module in named:
            if any(unseen.within(name, root) for root in scripted):
                continue  # (TorchScript takes no hooks; its code is out of sight anyway)
            hooks.append(module.register_forward_pre_hook(enter(name)))
            hooks.append(module.register_forward_hook(leave, always_call=True))

    def _where(self) -> str:
        return self._stack[-1] if self._stack else ""

    def _patch_modules(self, layout: ModelLayout) -> list:
        patched = []
        for path, module in layout.modules:
            entry = lookup_module(module)
            if entry is None:
                continue
            had = "forward" in module.__dict__
            old = module.__dict__.get("forward")
            module.__dict__["forward"] = self._module_site(path, module, entry, module.forward)
            patched.append((module, had, old))
        return patched

    # -- sites ------------------------------------------------------------------------------
    def _name(self, call: str) -> str:
        return f"{self._where()}:{call}" if self.track_modules else call

    def _keep(self, name: str, u: Tensor, copy: bool, weight: Tensor | None = None) -> None:
        if copy:
            rec = _Record(name, u.shape, u.dtype, u.detach().clone(), None, weight)
        else:
            rec = _Record(name, u.shape, u.dtype, u.detach(), u._version, weight)
            self._unkeyed.append(len(self.records))  # (its memory is looked up only if an in-place call comes)
        self.records.append(rec)

    def _keep_output(self, u: Tensor, out: Any) -> None:
        """Keep the output of the site just recorded: the secant then need not recompute f(ub)."""
        if isinstance(out, Tensor) and out.shape == u.shape and out.dtype == u.dtype:
            rec = self.records[-1]
            assert rec is not None
            rec.out, rec.out_version = out.detach(), out._version

    def _before_inplace(self, u: Tensor) -> None:
        """An in-place call is about to overwrite ``u``: copy records that still point at it."""
        for idx in self._unkeyed:
            rec = self.records[idx]
            if rec is not None and rec.version is not None:
                self._by_storage.setdefault(_storage_key(rec.u), []).append(idx)
        self._unkeyed.clear()
        for idx in self._by_storage.pop(_storage_key(u), []):
            rec = self.records[idx]
            if rec is not None and rec.version is not None and rec.u._version == rec.version:
                rec.u, rec.version = rec.u.clone(), None

    def _next(self, name: str, u: Tensor) -> _Record:
        k = self.cursor
        if k >= len(self.records):
            raise SiteMismatchError(
                f"the pass at the current parameters called {name} (averaged call #{k + 1}, input shape "
                f"{tuple(u.shape)}) but the pass at `other` made only {len(self.records)} averaged calls. "
                "Both passes must follow the same control flow."
            )
        rec = self.records[k]
        assert rec is not None
        _check_pair(k, rec, name, u.shape, u.dtype)
        self.records[k] = None  # release it as soon as it is consumed
        self.cursor = k + 1
        return rec

    def _transformed(self, call: str, u: Tensor) -> bool:
        """Whether this site runs inside a ``torch.func`` transform (``vmap`` in the model's
        forward): its inputs are the transform's wrappers, which cannot be kept past it, so the
        caller leaves it to its ordinary derivative in both passes — listed by ``inspect``,
        warned about once."""
        if not torch._C._are_functorch_transforms_active():
            return False
        if self.phase == "inspect":
            self.calls.append(SiteCall(self._where(), f"{call} (in torch.func transform)", False, tuple(u.shape)))
        else:
            unseen.warn_transformed(call)
        return True

    def _on_activation(self, func: Callable, act: Activation, form: CallForm, args: tuple, kwargs: dict):
        u, given, inplace = form.bind(args, kwargs)
        if not isinstance(u, Tensor) or not u.is_floating_point():
            return func(*args, **kwargs)
        if self._transformed(act.name, u):
            return func(*args, **kwargs)
        name = self._name(act.name)
        phase = self.phase
        if phase == "inspect":
            on = torch.is_grad_enabled()
            self.calls.append(SiteCall(self._where(), act.name, on, tuple(u.shape), inplace, grad_off=not on))
            return func(*args, **kwargs)
        if phase == "record":
            if inplace:
                self._before_inplace(u)
            weight = given.get("weight") if act.parametric else None
            self._keep(name, u, copy=inplace, weight=None if weight is None else weight.detach())
            out = None
            if act.record_forward is not None and not inplace and u.numel() >= RECORD_FORWARD_MIN and not (
                    u.requires_grad and torch.is_grad_enabled()):
                out = act.record_forward(u, **given) if given else act.record_forward(u)
            if out is None:
                out = func(*args, **kwargs)
            # f(ub): the secant need not recompute it. For clamp-like activations that is one cheap
            # pass, not worth holding their outputs while a "graph" pass's graph is alive (the
            # deferred schedule: slots waiting), where they would raise the peak memory; a secant
            # that forms f(ub) in its own pass (secant_forms_fb) does not need it at all.
            if not act.parametric and not (act.exact_secant and self.slots) and not (
                    act.secant_forms_fb is not None and act.secant_forms_fb(u)):
                self._keep_output(u, out)
            return out
        self._graph_site()
        if phase == "graph":
            slot = self._slot(name, u)
            settings = act.settings(given)
            if act.parametric:
                weight = settings["weight"]
                if not (u.requires_grad or weight.requires_grad):
                    return func(*args, **kwargs)
                return DeferredPReLU.apply(u, weight, slot)
            if not u.requires_grad:
                return func(*args, **kwargs)
            fn, derivative, closed_form = activation_callables(act, settings)
            grad_secant = bind_settings(act.grad_secant, settings)
            # A native op's own node runs its ordinary backward in the averaged backward too, whose
            # result the hook then replaces: on sites above PRODUCT_MAX that wasted pass costs more
            # than the autograd function's Python (which runs PyTorch's own vjp when ordinary).
            # In-place calls stay native: the autograd function's in-place route holds one more
            # site-sized tensor at the ordinary backward's peak (measured on resnet18: 1.37x -> 1.43x).
            if (u.grad_fn is not None and (u.numel() <= secant.PRODUCT_MAX or inplace or act.vjp is None)
                    and single_node_call(func, args, kwargs, u, inplace)):
                fns = (fn, derivative, act.exact(settings), closed_form, grad_secant)
                return native_site(lambda: func(*args, **kwargs), u, inplace, fns, slot)
            vjp = None
            if act.vjp is not None:
                vjp = (lambda g, x, y: act.vjp(g, x, y, **settings)) if settings else act.vjp
            call = lambda _u: func(*args, **kwargs)  # noqa: E731
            return DeferredActivation.apply(u, call, fn, derivative, inplace, act.exact(settings), closed_form, slot, vjp,
                                            grad_secant)
        rec = self._next(name, u)
        if act.parametric:
            weight = act.settings(given)["weight"]
            if not (u.requires_grad or weight.requires_grad):
                return func(*args, **kwargs)
            return SecantPReLU.apply(u, weight, rec.u, rec.weight)
        if not u.requires_grad:
            return func(*args, **kwargs)
        fb, fb_owned = rec.kept_output()
        checked = act.checked_secant
        if checked is not None and not given and not inplace and _small_dense(u, rec.u, fb):
            return _small_site(checked, act, func, args, kwargs, u, rec.u, fb, fb_owned)
        call = lambda _u: func(*args, **kwargs)  # noqa: E731  (the model's own call, unchanged)
        owned = rec.version is None or _sole_owner(rec.u)
        return averaged_activation_output(act, call, u, rec.u, act.settings(given), inplace, owned, fb, fb_owned)

    def _on_recurrent(self, func: Callable, args: tuple, kwargs: dict):
        """A fused recurrent call (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``, their cells) taken apart
        (:mod:`ttadapt.recurrent`), each gate activation a site (with ``linear=True``, step by
        step, each projection an affine one); ``NotImplemented`` where that does not apply."""

        def act(f: Callable, u: Tensor) -> Tensor:
            hit = lookup_call(f)
            if hit is None:  # (an unregistered activation)
                if self.phase == "inspect":
                    self.calls.append(SiteCall(self._where(), f.__name__, False, tuple(u.shape)))
                return f(u)
            return self._on_activation(f, hit[0], hit[1], (u,), {})

        linear = (lambda x, w, b: self._on_affine(F.linear, "linear", (x, w, b), {})) if self.linear else F.linear
        pair = self._affine_pair if self.linear else None  # (the Linear variant's projections batched over time)
        return recurrent.unfused(func, args, kwargs, act, linear, deferred=self.phase == "graph", pair=pair,
                                 rescale=self.rescale)

    def _affine_pair(self, u: Tensor, weight: Tensor) -> Projection | None:
        """A recurrent layer's projection ``u weightᵀ`` over all its rows as an affine site of the
        Linear variant whose backward the layer forms itself (:mod:`ttadapt.recurrent_sequence`):
        recorded at the other state; at the graph state, the :class:`Projection` that gives
        ``(u, weight)`` at the other state to the backward."""
        site = self._affine_site("linear", u, weight)
        if site is None:
            return None
        slot, rec = site
        if slot is not None:

            def take() -> tuple[Tensor, Tensor] | None:  # (None while the slot waits: the ordinary backward)
                if not slot.filled:
                    return None
                ub, _, wb = slot.take_other()
                assert wb is not None
                return ub, wb

            return Projection(take, slot.rescale)
        assert rec is not None and rec.weight is not None
        return Projection(lambda: (rec.u, rec.weight))

    def _affine_site(self, kind: str, u: Tensor, weight: Tensor) -> tuple[DeferredSlot | None, _Record | None] | None:
        """One affine site's bookkeeping: listed (``inspect``) or its input and weight kept (the
        pass at the other state) — None; in a pass at the graph state, its deferred slot (AG-1 /
        AG-2's graph pass) or the record of the other state, as ``(slot, record)``."""
        name = self._name(kind)
        if self.phase == "inspect":
            on = torch.is_grad_enabled()
            self.calls.append(SiteCall(self._where(), kind, on, tuple(u.shape), grad_off=not on))
            return None
        if self.phase == "record":
            self._keep(name, u, copy=False, weight=weight.detach())
            return None
        self._graph_site()
        if self.phase == "graph":
            return self._slot(name, u), None
        return None, self._next(name, u)

    def _on_affine(self, func: Callable, kind: str, args: tuple, kwargs: dict):
        names = ("input", "weight", "bias") if kind == "linear" else ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        u, weight, bias = bound.get("input"), bound.get("weight"), bound.get("bias")
        if not isinstance(u, Tensor) or not isinstance(weight, Tensor) or not u.is_floating_point():
            return func(*args, **kwargs)
        if self._transformed(kind, u):
            return func(*args, **kwargs)
        site = self._affine_site(kind, u, weight)
        if site is None:
            return func(*args, **kwargs)
        slot, rec = site
        if not (u.requires_grad or weight.requires_grad or (isinstance(bias, Tensor) and bias.requires_grad)):
            return func(*args, **kwargs)
        conv_args = ()
        if kind != "linear":
            conv_args = (bound.get("stride", 1), bound.get("padding", 0), bound.get("dilation", 1), bound.get("groups", 1))
        if slot is not None:
            return DeferredAffine.apply(u, weight, bias, kind, conv_args, slot)
        return AveragedAffine.apply(u, weight, bias, rec.u, rec.weight, kind, conv_args)

    def _log_unaveraged(self, func: Callable, args: tuple, kwargs: dict) -> None:
        """A nonlinear pointwise call that keeps its ordinary derivative — listed only where an
        input carries a gradient (depends on a parameter; a fused recurrent call's weights come
        in a list): on constants (a rotary embedding's ``cos`` of positions, a fixed mask's
        ``exp``) both passes see the same values and there is nothing to average."""
        flat = [t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, (list, tuple)) else (a,))]
        grads = [t for t in flat if isinstance(t, Tensor) and t.is_floating_point() and t.requires_grad]
        if grads:
            u = flat[0] if flat and isinstance(flat[0], Tensor) else grads[0]
            self.calls.append(SiteCall(self._where(), UNAVERAGED_POINTWISE[func], False, tuple(u.shape)))

    def _log_masking(self, func: Callable, args: tuple, kwargs: dict) -> None:
        """A comparison (or binary max / min) of a value that requires a gradient: see
        :data:`ttadapt.activations.MASKING_CALLS`."""
        u = args[0] if args else kwargs.get("input")
        other = args[1] if len(args) > 1 else kwargs.get("other")
        if func in BINARY_EXTREMA:
            if not isinstance(other, Tensor):  # (a reduction, not a pointwise call)
                return
            name = BINARY_EXTREMA[func]
        else:
            name = MASKING_CALLS[func]
        grads = [t for t in (u, other) if isinstance(t, Tensor) and t.is_floating_point() and t.requires_grad]
        if grads:
            self.calls.append(SiteCall(self._where(), name, False, tuple(grads[0].shape)))

    def _aten_op(self, func: Any, args: tuple, kwargs: dict) -> None:
        """A ``torch.ops.aten`` call of an activation (``torch.ops.aten.relu.default(x)``): the
        registry knows the Python forms only, so it keeps its ordinary derivative; ``inspect``
        lists it, an averaged pass warns once per op."""
        hit = unseen.aten_activation(func)
        if hit is None:
            return
        u = args[0] if args else None
        if self.phase != "inspect":
            unseen.warn_aten(*hit)
        elif isinstance(u, Tensor) and u.is_floating_point():
            self.calls.append(SiteCall(self._where(), f"aten.{hit[1]}", False, tuple(u.shape)))

    def _module_site(self, path: str, module: nn.Module, entry: ModuleActivation, forward: Callable) -> Callable:
        """The patched ``forward`` of an activation registered by module class."""

        def site_forward(*args: Any, **kwargs: Any):
            u = args[0] if args else None
            if self.opaque or not isinstance(u, Tensor) or not u.is_floating_point():
                return forward(*args, **kwargs)
            if self._transformed(entry.name, u):
                return forward(*args, **kwargs)
            fwd = (lambda x: forward(x, *args[1:], **kwargs)) if (len(args) > 1 or kwargs) else forward
            phase = self.phase
            name = f"{path}:{entry.name}" if self.track_modules else f"{entry.name}@{path}"
            self.opaque += 1
            try:
                if phase == "inspect":
                    on = torch.is_grad_enabled()
                    self.calls.append(SiteCall(path, entry.name, on, tuple(u.shape), grad_off=not on))
                    return fwd(u)
                if phase == "record":
                    self._keep(name, u, copy=False)
                    out = fwd(u)
                    self._keep_output(u, out)
                    return out
                self._graph_site()
                derivative = lambda x: entry.derivative(module, fwd, x)  # noqa: E731
                trainable = [p for p in module.parameters() if p.requires_grad]
                if phase == "graph":
                    slot = self._slot(name, u)
                    if not trainable:
                        return DeferredModule.apply(u, fwd, derivative, slot) if u.requires_grad else fwd(u)
                    return DeferredPassThrough.apply(u, fwd(u.detach()), fwd, derivative, slot)
                rec = self._next(name, u)
                owned = rec.version is None or _sole_owner(rec.u)
                fb, fb_owned = rec.kept_output()
                if not trainable:
                    if not u.requires_grad:
                        return fwd(u)
                    return SecantModule.apply(u, rec.u, fwd, derivative, owned, fb, fb_owned)
                y = fwd(u.detach())  # graph to the module's own parameters, at the graph state
                with torch.no_grad():
                    slope = secant_slope(fwd, derivative, u.detach(), y.detach(), rec.u, owned, fb, fb_owned)
                return SecantPassThrough.apply(u, y, slope)
            finally:
                self.opaque -= 1

        return site_forward
