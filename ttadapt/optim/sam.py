"""SAM (sharpness-aware minimization) around any base optimizer, the baseline AG-3 competes with."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..averaged import call_closure, explain_backward_in_closure
from ..collector import pausing_collector
from ..states import ModelLayout, evaluated_at
from .base import Closure, OptimizerWrapper, all_finite

__all__ = ["SAM", "sam_point"]


def sam_point(params: dict[str, Tensor], grads: dict[str, Tensor], rho: float, adaptive: bool = False,
              eps: float = 1e-12) -> dict[str, Tensor]:
    """θ + ρ·g/‖g‖ (ASAM with ``adaptive``: θ + ρ·T²g/‖Tg‖, T = |θ|), as fresh leaf tensors that
    require a gradient; the parameters themselves are not touched."""
    with torch.no_grad():
        scaled = {n: g * params[n].abs() if adaptive else g for n, g in grads.items()}
        norm = torch.sqrt(sum(s.double().square().sum() for s in scaled.values())) if scaled else torch.zeros((), dtype=torch.float64)
        factor = rho / (norm + eps)
        out = {}
        for n, s in scaled.items():
            p = params[n]
            e = s * p.abs() if adaptive else s
            out[n] = (p.detach() + e * factor.to(p.dtype)).requires_grad_(True)
    return out


class SAM(OptimizerWrapper):
    """SAM: the base optimizer steps with the gradient at the worst-case neighbour
    θ + ρ·g/‖g‖ (ASAM with ``adaptive=True``: θ + ρ·T²g/‖Tg‖, T = |θ|).

    The perturbed pass evaluates the model at θ + e without writing into the parameters (so the
    perturbation is undone exactly: nothing is subtracted) and on private copies of the buffers
    (so BatchNorm statistics are updated once per step, by the first pass). Cost:
    2·T_fwd + 2·T_bwd + T_opt.

    ``reduce``: a callable applied in place to the list of gradients of each pass before they are
    used, e.g. an all-reduce mean across data-parallel ranks (``ttadapt finetune`` passes one), so
    that the perturbation and the update are those of the global batch. The closure then calls
    the unwrapped module, not a DistributedDataParallel wrapper.
    """

    def __init__(self, model: nn.Module, optimizer: Any, *, rho: float = 0.05, adaptive: bool = False, eps: float = 1e-12,
                 reduce: Callable[[list[Tensor]], None] | None = None) -> None:
        if not (isinstance(rho, (int, float)) and rho >= 0):
            raise ValueError(f"rho must be a non-negative number, got {rho!r}")
        super().__init__(model, optimizer)
        self.rho = float(rho)
        self.adaptive = bool(adaptive)
        self.eps = float(eps)
        self.reduce = reduce

    def _hyper(self) -> dict[str, Any]:
        return {"rho": self.rho, "adaptive": self.adaptive}

    @pausing_collector
    @torch.enable_grad()  # (a step taken under no_grad still takes its gradients, as LBFGS's does)
    @explain_backward_in_closure
    def step(self, closure: Closure) -> Tensor:
        """One update on the batch the closure evaluates; returns the loss at θ."""
        closure = self._check_closure(closure)
        layout = ModelLayout(self.model)
        params = self._names(layout)
        buffers = self._save_buffers(layout)
        names = list(params)
        loss = call_closure(closure)
        grads = list(torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)) if loss.requires_grad else [None] * len(names)
        grads = [g if g is not None else torch.zeros_like(params[n]) for n, g in zip(names, grads)]
        if self.reduce is not None:
            self.reduce(grads)
        loss = loss.detach()
        if not all_finite(loss, *grads):
            self._restore_buffers(layout, buffers)
            self._skip("loss" if not all_finite(loss) else "gradient")
            return loss
        perturbed = sam_point(params, dict(zip(names, grads)), self.rho, self.adaptive, self.eps)
        with evaluated_at(layout, perturbed, copy_buffers=True):
            loss_e = call_closure(closure)
        sharp = list(torch.autograd.grad(loss_e, [perturbed[n] for n in names], allow_unused=True)) if loss_e.requires_grad else [None] * len(names)
        sharp = [g if g is not None else torch.zeros_like(params[n]) for n, g in zip(names, sharp)]
        if self.reduce is not None:
            self.reduce(sharp)
        if not all_finite(loss_e, *sharp):
            self._restore_buffers(layout, buffers)
            self._skip("perturbed gradient")
            return loss
        for n, g in zip(names, sharp):
            params[n].grad = g
        self.optimizer.step()
        self.step_count += 1
        return loss
