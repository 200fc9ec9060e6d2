"""AG-2's dry step in closed form, for ``torch.optim``'s Adam, AdamW and RMSprop on the CPU.

AG-2 needs θ″ = OPT(s_before, θ, G′) — the base optimizer's step from the state before the
forecast, with the averaged gradient — only to read its direction and length, then discards
it. The generic route (:meth:`OptimizerSnapshot.swap_in`, a real ``step()``, two L1 passes, a
rescale) costs a whole optimizer step and four more passes over the parameters: on the CPU,
about a sixth of a plain resnet18 step with Adam. For torch's own Adam, AdamW and RMSprop the
step is elementwise, so one fused pass over θ, θ′, G′ and the saved moments
(:func:`ttadapt.kernels.adam_direction`, :func:`ttadapt.kernels.rmsprop_direction`) gives
θ″ − θ and both L1 lengths, reading the optimizer state and writing nothing but the
parameters. It follows the single-tensor ``step()`` operation by operation, so the two routes
agree to float32 rounding (tested against the real optimizer, over its options).

It applies only where it is the same computation: the exact classes (not subclasses), options
known to this module (``maximize``, ``amsgrad``, weight decay either way, ``centered``,
``momentum``), no ``capturable``/``differentiable``, no step hooks, and every tensor float32,
on the CPU and laid out alike. Anything else — another optimizer, a new torch option, a GPU —
runs the real ``step()``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import optimizer as _torch_optimizer

from .. import kernels
from .snapshot import OptimizerSnapshot

__all__ = ["dry_direction"]

# every option (``defaults`` key) of the classes as this module knows them: a torch release that
# adds one falls back to the real step rather than being silently ignored
_ADAM_OPTIONS = {"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable", "differentiable",
                 "fused", "decoupled_weight_decay"}
_RMSPROP_OPTIONS = {"lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize", "foreach", "capturable",
                    "differentiable"}

Call = Callable[[], "tuple[float, float] | None"]


def _value(x: Any) -> float:
    return float(x.item() if isinstance(x, Tensor) else x)


def _hooked(optimizer: Any) -> bool:
    return bool(getattr(optimizer, "_optimizer_step_pre_hooks", None) or getattr(optimizer, "_optimizer_step_post_hooks", None)
                or _torch_optimizer._global_optimizer_pre_hooks or _torch_optimizer._global_optimizer_post_hooks)


def _adam_call(d: Tensor, theta: Tensor, grad: Tensor, state: dict, settings: dict, decoupled_default: bool) -> Call | None:
    beta1, beta2 = (_value(b) for b in settings["betas"])
    lr, eps, wd = _value(settings["lr"]), _value(settings["eps"]), _value(settings["weight_decay"])
    amsgrad = bool(settings["amsgrad"])
    decoupled = bool(settings.get("decoupled_weight_decay", decoupled_default))
    if state:
        if "step" not in state or "exp_avg" not in state or "exp_avg_sq" not in state or (amsgrad and "max_exp_avg_sq" not in state):
            return None
        step = _value(state["step"]) + 1
        m, v, vmax = state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq") if amsgrad else None
    else:  # the first step: torch starts from zeros
        step = 1.0
        m = v = torch.zeros_like(theta)
        vmax = m if amsgrad else None
    sign = -1.0 if settings["maximize"] else 1.0
    hyper = [1 - beta1, beta2, 1 - beta2, -(lr / (1 - beta1**step)), (1 - beta2**step) ** 0.5, eps, sign,
             0.0 if decoupled else wd, 1 - lr * wd if decoupled else 1.0]
    return lambda: kernels.adam_direction(d, theta, grad, m, v, vmax, hyper)


def _rmsprop_call(d: Tensor, theta: Tensor, grad: Tensor, state: dict, settings: dict) -> Call | None:
    alpha, lr, eps = _value(settings["alpha"]), _value(settings["lr"]), _value(settings["eps"])
    wd, momentum, centered = _value(settings["weight_decay"]), _value(settings["momentum"]), bool(settings["centered"])
    if state:
        if "square_avg" not in state or (centered and "grad_avg" not in state) or (momentum > 0 and "momentum_buffer" not in state):
            return None
        sq, avg, buf = state["square_avg"], state.get("grad_avg") if centered else None, state.get("momentum_buffer") if momentum > 0 else None
    else:
        sq = torch.zeros_like(theta)
        avg, buf = (sq if centered else None), (sq if momentum > 0 else None)
    hyper = [alpha, 1 - alpha, -lr, eps, -1.0 if settings["maximize"] else 1.0, wd, momentum]
    return lambda: kernels.rmsprop_direction(d, theta, grad, sq, avg, buf, hyper)


def dry_direction(optimizer: Any, before: OptimizerSnapshot, params: dict[str, Tensor], theta: dict[str, Tensor],
                  grads: dict[str, Tensor]) -> tuple[float, float] | None:
    """With each parameter ``params[n]`` holding the forecast θ′: ``params[n] ← θ″ − θ`` for all
    of them, θ″ being one ``optimizer.step()`` from θ (``theta``) with ``grads`` and the state
    ``before`` captured, and the return value ``(‖θ′ − θ‖₁, ‖θ″ − θ‖₁)``. None, with nothing
    written, where the closed form does not apply (the caller runs the real step)."""
    kind = type(optimizer)
    if kind in (torch.optim.Adam, torch.optim.AdamW):
        known = _ADAM_OPTIONS
    elif kind is torch.optim.RMSprop:
        known = _RMSPROP_OPTIONS
    else:
        return None
    if not set(optimizer.defaults) <= known or _hooked(optimizer) or len(before.parts) != 1 or before.parts[0][0] is not optimizer:
        return None
    if not kernels.available():
        return None
    _, saved_state, saved_groups, _ = before.parts[0]
    names = {id(p): n for n, p in params.items()}
    calls: list[Call] = []
    zeroed: list[str] = []
    for group, settings in zip(optimizer.param_groups, saved_groups):
        if settings.get("capturable") or settings.get("differentiable"):
            return None
        for p in group["params"]:
            name = names.get(id(p))
            if name is None:  # does not require a gradient: the step leaves it alone
                continue
            grad = grads.get(name)
            if grad is None:  # no gradient: the step leaves it alone, θ″ − θ = 0
                zeroed.append(name)
                continue
            state = saved_state.get(p, {})
            call = (_adam_call(p.detach(), theta[name], grad, state, settings, kind is torch.optim.AdamW) if known is _ADAM_OPTIONS
                    else _rmsprop_call(p.detach(), theta[name], grad, state, settings))
            moments = [t for key, t in state.items() if key != "step" and isinstance(t, Tensor)]
            if call is None or not kernels.fits(p, theta[name], grad, *moments):
                return None
            calls.append(call)
    forecast = dry = 0.0
    for name in zeroed:
        forecast += float((params[name].detach() - theta[name]).abs().sum(dtype=torch.float64))
        params[name].detach().zero_()
    for call in calls:
        sums = call()
        if sums is None:  # checked above: cannot happen
            raise RuntimeError("a fused dry step did not apply after its checks passed")
        forecast += sums[0]
        dry += sums[1]
    return forecast, dry
