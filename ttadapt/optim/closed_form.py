"""torch.optim's Adam, AdamW and RMSprop steps in closed form on the CPU: AG-1/AG-2's forecast
and AG-2's dry step as fused kernels.

**The forecast** θ′ = OPT(s, θ, g) commits the state it reaches (s ← s′) but must be undone
when the averaged gradient turns out non-finite, and AG-2's dry step reads the state before
it. The generic route snapshots the whole optimizer state, then runs the real ``step()``: a
copy of every moment, plus a step that on the CPU walks each tensor five to ten times and pays
Python per tensor (on a small model with many layers, most of its cost). For torch's own
optimizers the step is elementwise, so :func:`fused_forecast` runs it as one call over all
tensors (:func:`ttadapt.kernels.adam_forecast`, :func:`ttadapt.kernels.rmsprop_forecast`),
writing θ′ into the parameters and the new moments into spare memory (:class:`SpareState`,
last step's retired moments), then swaps those in: the state before is never copied, and
:meth:`FusedForecast.restore` reinstates it as it was, bit for bit.

**AG-2's dry step** θ″ = OPT(s_before, θ, G′) is needed only for its direction and length,
then discarded. The generic route (:meth:`OptimizerSnapshot.swap_in`, a real ``step()``, two
L1 passes, a rescale) costs a whole optimizer step and four more passes over the parameters.
:func:`dry_direction` gives θ″ − θ and both L1 lengths in one fused pass over θ, θ′, G′ and
the saved moments, all tensors in one call (:func:`ttadapt.kernels.adam_direction_many`,
:func:`ttadapt.kernels.rmsprop_direction_many`), reading the optimizer state and writing
nothing but the parameters.

Both follow the single-tensor ``step()`` operation by operation, with the roundings of ATen's
vectorised kernels, so they agree with the real step to float32 rounding (tested against it,
over its options). They apply only where they are the same computation: the exact classes
(not subclasses), options known to this module (``maximize``, ``amsgrad``, weight decay either
way, ``centered``, ``momentum``), no ``capturable``/``differentiable``, no step hooks, and every
tensor float32, on the CPU and laid out alike; the forecast also needs the state built (torch
builds it on the first step). Anything else — another optimizer, a new torch option, a GPU —
runs the real ``step()``.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor
from torch.optim import optimizer as _torch_optimizer

from .. import kernels
from .snapshot import OptimizerSnapshot

__all__ = ["dry_direction", "fused_forecast", "FusedForecast", "SpareState"]

# every option (``defaults`` key) of the classes as this module knows them: a torch release that
# adds one falls back to the real step rather than being silently ignored
_ADAM_OPTIONS = {"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable", "differentiable",
                 "fused", "decoupled_weight_decay"}
_RMSPROP_OPTIONS = {"lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize", "foreach", "capturable",
                    "differentiable"}


def _value(x: Any) -> float:
    return float(x.item() if isinstance(x, Tensor) else x)


def _hooked(optimizer: Any) -> bool:
    return bool(getattr(optimizer, "_optimizer_step_pre_hooks", None) or getattr(optimizer, "_optimizer_step_post_hooks", None)
                or _torch_optimizer._global_optimizer_pre_hooks or _torch_optimizer._global_optimizer_post_hooks)


def _applies(optimizer: Any) -> set[str] | None:
    """The option set known for ``optimizer``'s class where the fused kernels can stand in for
    its ``step()`` (the exact class, no unknown option, no step hooks, kernels compiled); None
    elsewhere."""
    kind = type(optimizer)
    if kind in (torch.optim.Adam, torch.optim.AdamW):
        known = _ADAM_OPTIONS
    elif kind is torch.optim.RMSprop:
        known = _RMSPROP_OPTIONS
    else:
        return None
    if not set(optimizer.defaults) <= known or _hooked(optimizer) or not kernels.available():
        return None
    return known


def _adam_hyper(settings: dict, step: float, decoupled_default: bool) -> list[float]:
    """:func:`ttadapt.kernels.adam_direction_many`'s hyper-parameters for the step numbered ``step``."""
    beta1, beta2 = (_value(b) for b in settings["betas"])
    lr, eps, wd = _value(settings["lr"]), _value(settings["eps"]), _value(settings["weight_decay"])
    decoupled = bool(settings.get("decoupled_weight_decay", decoupled_default))
    sign = -1.0 if settings["maximize"] else 1.0
    return [1 - beta1, beta2, 1 - beta2, -(lr / (1 - beta1**step)), (1 - beta2**step) ** 0.5, eps, sign,
            0.0 if decoupled else wd, 1 - lr * wd if decoupled else 1.0]


def _rmsprop_hyper(settings: dict) -> list[float]:
    """:func:`ttadapt.kernels.rmsprop_direction_many`'s hyper-parameters."""
    alpha, lr, eps = _value(settings["alpha"]), _value(settings["lr"]), _value(settings["eps"])
    wd, momentum = _value(settings["weight_decay"]), _value(settings["momentum"])
    return [alpha, 1 - alpha, -lr, eps, -1.0 if settings["maximize"] else 1.0, wd, momentum]


def _state_keys(settings: dict, adam: bool) -> tuple[str | None, str | None, str | None]:
    """The state entries one step reads and writes, in the kernels' order (None: not used with
    these settings)."""
    if adam:
        return "exp_avg", "exp_avg_sq", ("max_exp_avg_sq" if settings["amsgrad"] else None)
    return ("square_avg", "grad_avg" if settings["centered"] else None,
            "momentum_buffer" if _value(settings["momentum"]) > 0 else None)


def _hyper(settings: dict, step: float, adam: bool, adamw: bool) -> list[float]:
    """The kernels' hyper-parameters for the step numbered ``step`` (Adam's depend on it)."""
    return _adam_hyper(settings, step, adamw) if adam else _rmsprop_hyper(settings)


def _moments(theta: Tensor, state: dict, keys: tuple, adam: bool) -> tuple[float, tuple] | None:
    """(the number of the step being taken, the state entries ``keys`` before it) from
    ``state`` — zeros where the step is the first (torch starts from zeros); None for a state
    this module does not know."""
    if not state:
        zeros = torch.zeros_like(theta)
        return 1.0, tuple(zeros if k is not None else None for k in keys)
    for k in keys:  # (loops, not generators: this runs per tensor and step)
        if k is not None and k not in state:
            return None
    if adam and "step" not in state:
        return None
    step = _value(state["step"]) + 1 if "step" in state else 1.0
    return step, tuple([state[k] if k is not None else None for k in keys])


def dry_direction(optimizer: Any, before: "OptimizerSnapshot | FusedForecast", params: dict[str, Tensor],
                  theta: dict[str, Tensor], grads: dict[str, Tensor]) -> tuple[float, float] | None:
    """With each parameter ``params[n]`` holding the forecast θ′: ``params[n] ← θ″ − θ`` for all
    of them, θ″ being one ``optimizer.step()`` from θ (``theta``) with ``grads`` and the state
    ``before`` the forecast (a snapshot of it, or the fused forecast that kept it), and the
    return value ``(‖θ′ − θ‖₁, ‖θ″ − θ‖₁)``. None, with nothing written, where the closed form
    does not apply (the caller runs the real step)."""
    known = _applies(optimizer)
    if known is None:
        return None
    kind = type(optimizer)
    if isinstance(before, FusedForecast):
        if before.optimizer is not optimizer:
            return None
        saved_state, saved_groups = before.state_before, optimizer.param_groups  # (a step leaves the settings alone)
    else:
        if len(before.parts) != 1 or before.parts[0][0] is not optimizer:
            return None
        _, saved_state, saved_groups, _ = before.parts[0]
    names = {id(p): n for n, p in params.items()}
    adam = known is _ADAM_OPTIONS
    targets: list[Tensor] = []
    starts: list[Tensor] = []
    grad_list: list[Tensor] = []
    moments: tuple[list, list, list] = ([], [], [])
    hyper: list[list[float]] = []
    zeroed: list[str] = []
    for group, settings in zip(optimizer.param_groups, saved_groups):
        if settings.get("capturable") or settings.get("differentiable"):
            return None
        keys = _state_keys(settings, adam)
        rows: dict[float, list[float]] = {}
        for p in group["params"]:
            name = names.get(id(p))
            if name is None:  # does not require a gradient: the step leaves it alone
                continue
            grad = grads.get(name)
            if grad is None:  # no gradient: the step leaves it alone, θ″ − θ = 0
                zeroed.append(name)
                continue
            found = _moments(theta[name], saved_state.get(p, {}), keys, adam)
            if found is None:
                return None
            step, these = found
            row = rows.get(step)
            if row is None:
                row = rows[step] = _hyper(settings, step, adam, kind is torch.optim.AdamW)
            targets.append(p)
            starts.append(theta[name])
            grad_list.append(grad)
            hyper.append(row)
            for column, t in zip(moments, these):
                column.append(t)
    run = kernels.adam_direction_many if adam else kernels.rmsprop_direction_many
    sums = run(targets, starts, grad_list, *moments, hyper)  # p ← θ″ − θ for all of them, or nothing written
    if sums is None:
        return None
    forecast, dry = sums
    for name in zeroed:
        forecast += float((params[name].detach() - theta[name]).abs().sum(dtype=torch.float64))
        params[name].detach().zero_()
    return forecast, dry


# -- the forecast step -------------------------------------------------------------------------
class SpareState:
    """Memory for the state a fused forecast writes: the tensors the previous forecast retired,
    by parameter and state entry. One is reused only while nothing else holds it (the optimizer
    state again, after a ``load_state_dict`` of an older state dict; a state dict the user
    kept), else new memory is taken: a forecast never writes into a tensor anyone else can see."""

    def __init__(self) -> None:
        self._pool: dict[tuple[int, str], Tensor] = {}

    def take(self, p: Tensor, key: str, like: Tensor) -> Tensor:
        """A tensor of ``like``'s shape to write ``p``'s entry ``key`` into. (Its dtype, device and
        layout are the kernel's to check, which declines the whole step, nothing written, on a
        mismatch; the caller then clears the pool.)"""
        spare = self._pool.pop((id(p), key), None)
        if spare is not None and sys.getrefcount(spare) <= _UNSHARED and spare.shape == like.shape:
            return spare
        return torch.empty_like(like)

    def give(self, p: Tensor, key: str, t: Tensor) -> None:
        self._pool[(id(p), key)] = t

    def clear(self) -> None:
        self._pool.clear()


def _unshared_refcount() -> int:
    """``sys.getrefcount`` of a tensor held by one local name only, as :meth:`SpareState.take`
    sees its candidate (measured: the count differs between Python versions)."""
    pool = {0: torch.empty(0)}
    spare = pool.pop(0)
    return sys.getrefcount(spare)


_UNSHARED = _unshared_refcount()


class FusedForecast:
    """A committed forecast step θ′ = OPT(s, θ, g) that kept the state before it: see
    :func:`fused_forecast`. :attr:`state_before` is that state (for AG-2's dry step);
    :meth:`restore` makes it the optimizer's again."""

    def __init__(self, optimizer: Any, entries: list[tuple[Tensor, dict, float, list[tuple[str, Tensor, Tensor]]]],
                 spares: SpareState) -> None:
        self.optimizer = optimizer
        self._entries = entries
        self._spares = spares

    @property
    def state_before(self) -> dict[Tensor, dict[str, Any]]:
        """``{parameter: {"step": the count before, entry: tensor before, ...}}``"""
        return {p: {"step": step, **{key: old for key, old, _ in swaps}} for p, _, step, swaps in self._entries}

    def restore(self) -> None:
        """Put the state before the forecast back (the same tensors, untouched; the step counts
        as they were). The parameters are the caller's to restore."""
        for p, state, step, swaps in self._entries:
            state["step"].fill_(step)
            for key, old, new in swaps:
                state[key] = old
                self._spares.give(p, key, new)


def fused_forecast(optimizer: Any, params: dict[str, Tensor], grads: dict[str, Tensor], spares: SpareState) -> FusedForecast | None:
    """One ``optimizer.step()`` with ``grads`` (by name, for the parameters ``params``) as one
    fused pass per tensor — θ′ into the parameters, the state after the step into spare memory,
    then swapped in and the step counts advanced — for torch's Adam, AdamW and RMSprop on the
    CPU with a state already built. The state before stays in its tensors, untouched: undoing
    the step (:meth:`FusedForecast.restore`) copies nothing, and neither does keeping it, where
    the generic route snapshots the whole state first. The result agrees with the real step to
    float32 rounding (the committed moments bit for bit where ATen's vector kernels fuse as
    these do). None, with nothing written, where it does not apply (the caller runs the real
    step)."""
    known = _applies(optimizer)
    if known is None:
        return None
    adam = known is _ADAM_OPTIONS
    names = {id(p): n for n, p in params.items()}
    targets: list[Tensor] = []
    grad_list: list[Tensor] = []
    inputs: tuple[list, list, list] = ([], [], [])
    hyper: list[list[float]] = []
    plan: list[tuple[Tensor, dict, float, tuple]] = []
    for group in optimizer.param_groups:
        if group.get("capturable") or group.get("differentiable"):
            return None
        keys = _state_keys(group, adam)
        rows: dict[float, list[float]] = {}
        for p in group["params"]:
            name = names.get(id(p))
            if name is None:
                if p.grad is not None:  # not among ``params`` but with a gradient: the real step would move it
                    return None
                continue
            grad = grads.get(name)
            if grad is None:  # no gradient: the real step leaves it alone
                continue
            state = optimizer.state.get(p)
            step_t = state.get("step") if state else None
            if not isinstance(step_t, Tensor) or step_t.numel() != 1:
                return None  # the first step (torch builds the state) or a state this module does not know
            found = _moments(p, state, keys, adam)
            if found is None or not 1 <= found[0] <= _MAX_STEP:
                return None
            number, these = found
            row = rows.get(number)
            if row is None:
                row = rows[number] = _hyper(group, number, adam, type(optimizer) is torch.optim.AdamW)
            targets.append(p)
            grad_list.append(grad)
            hyper.append(row)
            for column, t in zip(inputs, these):
                column.append(t)
            plan.append((p, state, number - 1, keys))
    outputs: tuple[list, list, list] = ([], [], [])
    for k, (p, _, _, keys) in enumerate(plan):
        for column, source, key in zip(outputs, inputs, keys):
            column.append(spares.take(p, key, source[k]) if key is not None else None)
    run = kernels.adam_forecast if adam else kernels.rmsprop_forecast
    steps = [state["step"] for _, state, _, _ in plan]
    counted = all(s.dtype is torch.float32 and s.is_cpu for s in steps)  # (torch's default; the kernel counts those)
    if not run(targets, grad_list, *inputs, *outputs, hyper, steps=steps if counted else None):
        spares.clear()  # nothing written; a spare laid out unlike its state entry is not taken again
        return None
    entries = []
    for k, (p, state, step, keys) in enumerate(plan):
        swaps = []
        for column, key in zip(outputs, keys):
            if key is not None:
                swaps.append((key, state[key], column[k]))
                state[key] = column[k]
        entries.append((p, state, step, swaps))
    if steps and not counted:
        torch._foreach_add_(steps, 1)  # as the real step: step_t += 1
    forecast = FusedForecast(optimizer, entries, spares)
    for p, _, _, swaps in entries:  # the state before is spare memory for the next forecast once this one is gone
        for key, old, _ in swaps:
            spares.give(p, key, old)
    return forecast


# above this a float32 step count no longer counts (x + 1 == x)
_MAX_STEP = float(1 << 24)
