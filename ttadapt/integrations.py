"""Hugging Face ``transformers.Trainer`` with AG-3 or SAM (DESIGN §2; issue 7).

    from ttadapt.integrations import AveragedGradientTrainer
    trainer = AveragedGradientTrainer(model=model, args=args, train_dataset=ds, ag_method="ag3", ag_d=45)
    trainer.train()

Only ``training_step`` changes: it leaves in ``.grad`` the gradient the method prescribes, and the
Trainer's own loop (gradient clipping, its optimizer and scheduler, logging, checkpoints) does the
rest. AG-3 keeps its anchors (parameter snapshots every ``ag_d`` optimizer steps) in an
:class:`~ttadapt.optim.AnchorStore`; the anchor pass runs on the unwrapped module.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

try:
    from transformers import Trainer
except ImportError as exc:  # pragma: no cover - optional dependency
    raise ImportError("ttadapt.integrations needs transformers (and accelerate): pip install 'ttadapt[hf]'") from exc

from .averaged import averaged_loss
from .optim.ag3 import anchor_index
from .optim.anchors import AnchorStore
from .optim.sam import sam_point
from .states import evaluated_at

__all__ = ["AveragedGradientTrainer"]


class AveragedGradientTrainer(Trainer):
    """A ``Trainer`` whose steps use AG-3 (``ag_method="ag3"``, ``ag_d=1`` for AG-3-1) or SAM
    (``ag_method="sam"``, radius ``sam_rho``), around whatever optimizer the Trainer builds."""

    def __init__(self, *args: Any, ag_method: str = "ag3", ag_d: int = 45, ag_linear: bool = False, sam_rho: float = 0.05,
                 anchor_storage: str = "device", **kwargs: Any) -> None:
        if ag_method not in ("ag3", "sam"):
            raise ValueError(f"ag_method must be 'ag3' or 'sam', got {ag_method!r}")
        if isinstance(ag_d, bool) or not isinstance(ag_d, int) or ag_d < 1:
            raise ValueError(f"ag_d must be an integer >= 1, got {ag_d!r}")
        super().__init__(*args, **kwargs)
        if ag_method == "ag3" and (getattr(self.args, "activation_checkpointing", False)
                                   or getattr(self.args, "gradient_checkpointing", False)):  # (the name before transformers 5)
            raise ValueError("AG-3 cannot run with activation (gradient) checkpointing: the checkpointed activations are "
                             "recomputed in the backward with ordinary derivatives, not the averaged ones")
        if ag_method == "sam" and self.args.gradient_accumulation_steps != 1:
            raise ValueError("SAM in the Trainer needs gradient_accumulation_steps=1")
        self.ag_method, self.ag_d, self.ag_linear, self.sam_rho = ag_method, ag_d, ag_linear, float(sam_rho)
        self.anchors = AnchorStore(anchor_storage)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        module = self.accelerator.unwrap_model(model)

        def closure() -> torch.Tensor:
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            return loss.mean() if loss.dim() else loss

        scale = 1.0 if num_items_in_batch is not None else 1.0 / self.args.gradient_accumulation_steps
        if self.ag_method == "ag3":
            t = self.state.global_step
            params = {n: p for n, p in module.named_parameters() if p.requires_grad}
            a = anchor_index(t, self.ag_d)
            other = self.anchors.other_state(a, params) if a != t else None  # (before d = 1 drops it below)
            if t % self.ag_d == 0 and t not in self.anchors:  # θ(t), before this step's update
                self.anchors.put(t, {n: p.detach() for n, p in params.items()})
                self.anchors.drop_before(anchor_index(t + 1, self.ag_d))  # what no later step needs
            if other is None:
                loss = closure()
            else:
                loss = averaged_loss(module, closure, other, seed="current", linear=self.ag_linear)
            self.accelerator.backward(loss * scale)
            return loss.detach() * scale
        # SAM: the gradient at θ + ρ·g/‖g‖, without writing into the parameters
        params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        names = list(params)
        loss = closure()
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(params[n]) for n, g in zip(names, grads)]
        perturbed = sam_point(params, dict(zip(names, grads)), self.sam_rho)
        with evaluated_at(module, perturbed, copy_buffers=True):
            loss_e = closure()
        sharp = torch.autograd.grad(loss_e, [perturbed[n] for n in names], allow_unused=True)
        for n, g in zip(names, sharp):
            if g is not None:
                p = params[n]
                p.grad = g if p.grad is None else p.grad + g
        return loss.detach()
