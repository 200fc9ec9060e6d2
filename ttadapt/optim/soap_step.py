"""SOAP's step over many parameters at once, from a snapshot of its state: AG-2's dry step
for ``pytorch_optimizer.SOAP``.

AG-2's dry step θ″ = OPT(s_before, θ, G′) (spec §3) is needed only for θ″; the state it
reaches is thrown away. pytorch-optimizer's SOAP walks its parameters one by one, about twenty
tensor operations each (projections into the preconditioner's eigenbasis, Adam's moments,
the projection back, weight decay, then the preconditioner refresh). On a model of many small
layers — Model B's 27 — that Python loop is most of the step. :func:`soap_dry_step` computes
the same θ″ from the state before the forecast, only reading it:

* matrices (2-D parameters with both eigenbases) of one shape, dtype and device, two or more:
  one batch, the projections ``Q0ᵀ X Q1`` and ``Q0 X Q1ᵀ`` as batched matrix products in the
  order and operand layouts of the library's ``tensordot`` calls, Adam's moments on the batch;
* vectors SOAP leaves unprojected (biases without ``precondition_1d``): one concatenation;
* anything else (convolution kernels, a dimension above ``max_precondition_dim``,
  ``precondition_1d``, a matrix alone of its shape) one by one through the optimizer's own
  ``project``.

Per parameter it is SOAP's ``step()``:
``m = lerp(exp_avg, g, 1 − β1)``, ``v = lerp(exp_avg_sq, P(g)², 1 − β2)``,
``N = P⁻¹(P(m) / (√v + eps))`` (divided by its root mean square plus eps with
``normalize_gradient``), ``θ″ = (θ − step_size·N)·(1 − lr·weight_decay)`` with
``step_size = lr·√(1 − β2^k)/(1 − β1^k)`` (``correct_bias``) at the group's step k.

**Bits.** The elementwise operations give the same floats on a batch as on each member, and on
the CPU a batched product of small matrices the same as the library's per-matrix product (both
checked on this project's machine: θ″ equal bit for bit, tests/test_soap_step.py). Where a
platform's batched product rounds otherwise, θ″ differs by rounding — and that can grow: in
eigendirections of a preconditioner that no gradient has reached yet (a wide layer's, early in
training) SOAP's projected moments are rounding noise and ``P(m)/(√v + eps)`` divides noise by
noise, so there the real step's own values depend on its summation order.

**The formula** is this module's reading of the library's code. It is checked once per process,
class and code path against the library's real step on a small problem (:func:`_formula_holds`);
where it disagrees (another version of the library), AG-2 runs the real dry step, with a warning.

It applies to the exact class with the options in ``_OPTIONS`` (no ``maximize``, ``merge_dims``
off), no step hooks, and a state built by at least one step, on any device.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch
from torch import Tensor

from .closed_form import _hooked
from .snapshot import BATCHED_SOAP_MODULE, OptimizerSnapshot

__all__ = ["soap_dry_step", "agrees"]

_OPTIONS = {"lr", "betas", "shampoo_beta", "weight_decay", "precondition_frequency", "max_precondition_dim", "merge_dims",
            "precondition_1d", "correct_bias", "normalize_gradient", "eps"}
_GROUP_KEYS = _OPTIONS | {"step"}  # a snapshot's group: the settings and the step count, not the parameters
_CHECKED: dict[tuple, bool] = {}  # (class, settings that select a code path) -> whether the formula held


def _is_soap(optimizer: Any) -> bool:
    """The library's SOAP, or ttadapt's batched one (the library's state and arithmetic)."""
    kind = type(optimizer)
    return (kind.__module__, kind.__name__) in (("pytorch_optimizer.optimizer.soap", "SOAP"),
                                               (BATCHED_SOAP_MODULE, "BatchedSOAP"))


def soap_dry_step(optimizer: Any, before: Any, params: dict[str, Tensor], theta: dict[str, Tensor],
                  grads: dict[str, Tensor], check: bool = True) -> dict[str, Tensor] | None:
    """``{name: θ″}`` for every name of ``params``: one ``optimizer.step()`` from θ (``theta``)
    with ``grads`` and the state in the snapshot ``before`` (θ itself where a name has no
    gradient: the step leaves it alone). Reads the snapshot only; writes nothing. None where
    it does not apply, or (``check``) where the formula has not held against the library's
    step for these settings (the caller runs the real step)."""
    if not _is_soap(optimizer) or _hooked(optimizer) or getattr(optimizer, "maximize", True):
        return None
    if not isinstance(before, OptimizerSnapshot) or len(before.parts) != 1 or before.parts[0][0] is not optimizer:
        return None
    _, saved_state, saved_groups, _ = before.parts[0]
    if len(saved_groups) != len(optimizer.param_groups):
        return None
    names = {id(p): n for n, p in params.items()}
    out: dict[str, Tensor] = {}
    for group, settings in zip(optimizer.param_groups, saved_groups):
        if set(settings) != _GROUP_KEYS or settings["merge_dims"] or not isinstance(settings["step"], int):
            return None
        k = settings["step"]  # the dry step is the group's step k + 1; SOAP's formulas use k
        if k < 1 or (check and not _formula_holds(type(optimizer), settings)):  # (step 1 only builds the preconditioner)
            return None
        beta1, beta2 = settings["betas"]
        lr, decay = float(settings["lr"]), float(settings["weight_decay"])
        step_size = lr
        if settings["correct_bias"]:
            step_size *= math.sqrt(1.0 - math.pow(beta2, k)) / (1.0 - math.pow(beta1, k))
        hyper = (1.0 - beta1, 1.0 - beta2, float(settings["eps"]), step_size, 1.0 - decay * lr,
                 bool(settings["normalize_gradient"]))
        batches: dict[tuple, list[tuple[str, Tensor, dict]]] = {}
        singles: list[tuple[str, Tensor, dict]] = []
        for p in group["params"]:
            name = names.get(id(p))
            if name is None:
                continue
            grad = grads.get(name)
            if grad is None:
                out[name] = theta[name]
                continue
            state = saved_state.get(p)
            q = state.get("Q") if state else None
            if not (isinstance(q, list) and isinstance(state.get("exp_avg"), Tensor) and isinstance(state.get("exp_avg_sq"), Tensor)):
                return None
            if not (grad.dtype is theta[name].dtype is state["exp_avg"].dtype):  # (the library's type promotions: not ours)
                return None
            if grad.dim() == 2 and len(q) == 2 and all(isinstance(m, Tensor) for m in q):
                batches.setdefault(("matrix", grad.shape, grad.dtype, grad.device), []).append((name, grad, state))
            elif grad.dim() == 1 and len(q) == 1 and not isinstance(q[0], Tensor):
                batches.setdefault(("vector", grad.dtype, grad.device), []).append((name, grad, state))
            else:
                singles.append((name, grad, state))
        for key, rows in batches.items():
            if key[0] == "matrix" and len(rows) == 1:  # (alone of its shape: the library's own products)
                singles.extend(rows)
            elif key[0] == "matrix":
                _matrices(rows, theta, hyper, out)
            else:
                _vectors(rows, theta, hyper, out)
        for name, grad, state in singles:
            out[name] = _single(optimizer, settings, grad, state, theta[name], hyper)
    return {n: out.get(n, theta[n]) for n in params}  # (a name in no group: the step leaves it alone)


def _step(t: Tensor, g: Tensor, g_projected_sq: Tensor, m: Tensor, v: Tensor, project: Callable[[Tensor], Tensor],
          back: Callable[[Tensor], Tensor], hyper: tuple, dims: tuple[int, ...]) -> Tensor:
    """θ″ from θ (``t``), the gradient, its projection squared and the moments before the step,
    operation by operation as SOAP's ``step()``, for one tensor or a batch (``dims``: each
    member's own dimensions)."""
    w1, w2, eps, step_size, keep, normalize = hyper
    m1 = torch.lerp(m, g, w1)
    v1 = torch.lerp(v, g_projected_sq, w2)
    n = back(project(m1) / v1.sqrt().add_(eps))
    if normalize:
        n = n.div_(n.square().mean(dim=dims, keepdim=True).sqrt_().add_(eps))
    new = torch.add(t, n, alpha=-step_size)
    return new.mul_(keep) if keep != 1.0 else new


def _stack_alike(matrices: list[Tensor]) -> Tensor:
    """The matrices stacked, each member laid out as they are where they share a layout (the
    eigenbases from ``torch.linalg.qr``/``eigh`` are column-major): a product's rounding can
    depend on its operands' layout, and the library multiplies them as they are."""
    if all(m.mT.is_contiguous() for m in matrices) and not all(m.is_contiguous() for m in matrices):
        return torch.stack([m.mT for m in matrices]).mT
    return torch.stack(matrices)


def batched_projections(states: list[dict]) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """SOAP's projection into the eigenbases and back for a batch of like-shaped matrices (their
    states' ``Q``), as batched products in the order of the library's two ``tensordot`` calls
    per projection: (Xᵀ Q0)ᵀ Q1 = Q0ᵀ X Q1 forward, (Xᵀ Q0ᵀ)ᵀ Q1ᵀ = Q0 X Q1ᵀ backward."""
    q0 = _stack_alike([state["Q"][0] for state in states])
    q1 = _stack_alike([state["Q"][1] for state in states])
    q0t, q1t = q0.mT, q1.mT

    def project(x: Tensor) -> Tensor:
        return torch.bmm(torch.bmm(x.mT, q0).mT, q1)

    def back(x: Tensor) -> Tensor:
        return torch.bmm(torch.bmm(x.mT, q0t).mT, q1t)

    return project, back


def _matrices(rows: list[tuple[str, Tensor, dict]], theta: dict[str, Tensor], hyper: tuple, out: dict[str, Tensor]) -> None:
    """Matrices of one shape as one batch: their θ″ into ``out``."""
    names = [name for name, _, _ in rows]
    g = torch.stack([grad for _, grad, _ in rows])
    project, back = batched_projections([state for _, _, state in rows])
    m = torch.stack([state["exp_avg"] for _, _, state in rows])
    v = torch.stack([state["exp_avg_sq"] for _, _, state in rows])
    t = torch.stack([theta[n] for n in names])
    out.update(zip(names, _step(t, g, project(g).square_(), m, v, project, back, hyper, (1, 2)).unbind(0)))


def _identity(x: Tensor) -> Tensor:
    return x


def _vectors(rows: list[tuple[str, Tensor, dict]], theta: dict[str, Tensor], hyper: tuple, out: dict[str, Tensor]) -> None:
    """Vectors SOAP leaves in their own basis, concatenated (``normalize_gradient``'s mean is
    per vector: then one by one): their θ″ into ``out``."""
    if hyper[5]:
        for name, grad, state in rows:
            out[name] = _step(theta[name], grad, grad.square(), state["exp_avg"], state["exp_avg_sq"], _identity, _identity,
                              hyper, (0,))
        return
    g = torch.cat([grad for _, grad, _ in rows])
    m = torch.cat([state["exp_avg"] for _, _, state in rows])
    v = torch.cat([state["exp_avg_sq"] for _, _, state in rows])
    t = torch.cat([theta[name] for name, _, _ in rows])
    new = _step(t, g, g.square(), m, v, _identity, _identity, hyper, (0,))
    out.update(zip([name for name, _, _ in rows], new.split([grad.numel() for _, grad, _ in rows])))


def _single(optimizer: Any, settings: dict, grad: Tensor, state: dict, t: Tensor, hyper: tuple) -> Tensor:
    """One tensor through the optimizer's own projection (any shape SOAP handles)."""
    dim = settings["max_precondition_dim"]

    def project(x: Tensor) -> Tensor:
        return optimizer.project(x, state, merge_dims=False, max_precondition_dim=dim)

    def back(x: Tensor) -> Tensor:
        return optimizer.project(x, state, merge_dims=False, max_precondition_dim=dim, project_type="backward")

    return _step(t, grad, project(grad).square(), state["exp_avg"], state["exp_avg_sq"], project, back, hyper,
                 tuple(range(grad.dim())))


def agrees(new: dict[str, Tensor], params: dict[str, Tensor], theta: dict[str, Tensor]) -> bool:
    """Whether ``new`` matches the parameters a real step left, each tensor to 1e-3 of its
    largest step plus four ulps of θ (a platform's batched products may round otherwise than
    the library's; a different formula misses by more)."""
    with torch.no_grad():
        for name, p in params.items():
            real, ours = p.detach(), new[name]
            if real.shape != ours.shape or not (bool(torch.isfinite(real).all()) and bool(torch.isfinite(ours).all())):
                return False
            step = real - theta[name]
            allowed = 1e-3 * float(step.abs().max()) + 4 * torch.finfo(real.dtype).eps * theta[name].abs()
            if bool(((real - ours).abs() > allowed).any()):
                return False
    return True


def _formula_holds(kind: type, settings: dict) -> bool:
    """Whether :func:`soap_dry_step` gives the library's step for these settings: checked once
    per class and code path (bias correction, normalisation, 1-D preconditioning, weight decay
    or not) on a scratch optimizer of the class — two matrices of a shape, a vector and a 4-D
    kernel, twelve steps of random gradients (a generator of its own: the global one is left
    alone), then one step both ways."""
    key = (kind, bool(settings["correct_bias"]), bool(settings["normalize_gradient"]), bool(settings["precondition_1d"]),
           float(settings["weight_decay"]) != 0.0)
    held = _CHECKED.get(key)
    if held is not None:
        return held
    options = {k: v for k, v in settings.items() if k in _OPTIONS}
    options.update(lr=1e-2, merge_dims=False, max_precondition_dim=10000)
    rng = torch.Generator().manual_seed(0)
    shapes = {"matrix": (6, 5), "matrix2": (6, 5), "vector": (5,), "kernel": (4, 3, 2, 2)}
    params = {n: torch.nn.Parameter(torch.randn(shape, generator=rng)) for n, shape in shapes.items()}
    try:
        opt = kind(list(params.values()), **options)
        for _ in range(12):
            for p in params.values():
                p.grad = torch.randn(p.shape, generator=rng)
            opt.step()
        grads = {n: torch.randn(p.shape, generator=rng) for n, p in params.items()}
        theta = {n: p.detach().clone() for n, p in params.items()}
        new = soap_dry_step(opt, OptimizerSnapshot(opt), params, theta, grads, check=False)
        for n, p in params.items():
            p.grad = grads[n]
        opt.step()
        held = new is not None and agrees(new, params, theta)
    except Exception:  # noqa: BLE001 - a library that builds or steps otherwise: not this module's formula
        held = False
    if not held:
        warnings.warn(f"ttadapt: {kind.__module__}.{kind.__qualname__}'s step differs from ttadapt's closed form of it "
                      "(another version of pytorch-optimizer?); AG-2 runs its real dry step instead (slower)",
                      RuntimeWarning, stacklevel=4)
    _CHECKED[key] = held
    return held
