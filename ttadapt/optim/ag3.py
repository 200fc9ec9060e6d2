"""AG-3: backward-looking averaged gradient towards an older parameter state (spec §3, Alg. 1)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from ..averaged import averaged_loss, call_closure, explain_backward_in_closure
from ..collector import pausing_collector
from ..states import ModelLayout
from .anchors import AnchorStore
from .base import Closure, OptimizerWrapper, all_finite

__all__ = ["AG3", "anchor_index"]


def anchor_index(step: int, d: int) -> int:
    """The step whose parameters anchor step ``step``: ``max(0, ⌊step/d⌋·d − d)`` — between
    ``d`` and ``2d`` steps old (the first ``d`` steps use the initial parameters)."""
    return max(0, (step // d) * d - d)


class AG3(OptimizerWrapper):
    """AG-3: the base optimizer steps with the averaged gradient between an anchor θ(a) and the
    current θ(t), graph and loss-gradient state θ(t).

    Args:
        model: the model the closure evaluates.
        optimizer: the base optimizer over (some of) ``model``'s parameters.
        d: anchor period. Every ``d`` steps the current parameters become a snapshot; step t is
            anchored at step :func:`anchor_index` ``(t, d)``. ``d=1`` is AG-3-1 (anchor = the
            previous step's parameters).
        linear: the Linear variant for affine layers.
        anchor_storage: ``"device"``, ``"cpu"`` or ``"disk"`` (see :class:`AnchorStore`).
        anchor_dir: where ``"disk"`` snapshots go, in a private subdirectory this wrapper
            creates and removes (default: the system's temporary directory; see
            :class:`AnchorStore`).

    Parameters the optimizer takes on later (``add_param_group``, or ``requires_grad`` switched
    on) have no value in the snapshots taken before: until the next snapshot their anchor value is
    their current one — right for a layer that was frozen until then.

    Cost per step: 2·T_fwd + T_bwd + T_opt (the anchor forward builds no graph). At most two
    snapshots are kept (one for ``d=1``). Step 0 is anchored at itself, i.e. it is a plain base-optimizer step.
    """

    def __init__(self, model: nn.Module, optimizer: Any, *, d: int = 45, linear: bool = False,
                 anchor_storage: str = "device", anchor_dir: str | os.PathLike | None = None) -> None:
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"d must be an integer >= 1, got {d!r}")
        super().__init__(model, optimizer)
        self.d = d
        self.linear = bool(linear)
        self.anchors = AnchorStore(anchor_storage, anchor_dir)
        self.last_anchor: int | None = None

    def _hyper(self) -> dict[str, Any]:
        return {"d": self.d, "linear": self.linear, "anchor_storage": self.anchors.storage}

    @pausing_collector
    @torch.enable_grad()  # (a step taken under no_grad still takes its gradients, as LBFGS's does)
    @explain_backward_in_closure
    def step(self, closure: Closure, *, anchor_closure: Closure | None = None) -> Tensor:
        """One update on the batch the closure evaluates; returns the loss at θ(t).

        ``anchor_closure`` (default: ``closure``) runs the no-graph pass at the anchor. With
        DistributedDataParallel, ``closure`` calls the DDP wrapper and ``anchor_closure`` calls
        ``ddp.module`` (this wrapper's ``model``); the averaged gradient then flows through the
        wrapper's graph and its reducer averages it across ranks.
        """
        closure = self._check_closure(closure)
        t = self.step_count
        layout = ModelLayout(self.model)
        params = self._names(layout)
        buffers = self._save_buffers(layout)
        a = anchor_index(t, self.d)
        old_grads = {n: p.grad for n, p in params.items()}

        def undo() -> None:  # (.grad and BatchNorm statistics as before the step)
            for n, p in params.items():
                p.grad = old_grads[n]
            self._restore_buffers(layout, buffers)

        self.optimizer.zero_grad(set_to_none=True)
        try:
            if a == t:
                loss = call_closure(closure)
            else:
                loss = averaged_loss(self.model, closure, self.anchors.other_state(a, params), seed="current",
                                     linear=self.linear, layout=layout, other_closure=anchor_closure)
        except BaseException:  # (a pass that raised may have updated BatchNorm statistics)
            undo()
            raise
        if loss.requires_grad:
            loss.backward()
        loss = loss.detach()
        grads = [p.grad for p in params.values()]
        if not all_finite(loss, *grads):
            undo()
            self._skip("loss" if not all_finite(loss) else "averaged gradient")
            return loss
        if t % self.d == 0:
            self.anchors.put(t, {n: p.detach() for n, p in params.items()})
            self.anchors.drop_before(anchor_index(t + 1, self.d))  # what no later step needs
        self.optimizer.step()
        self.last_anchor = a
        self.step_count += 1
        return loss

    def _extra_state(self) -> dict[str, Any]:
        return {"anchors": self.anchors.state_dict()}

    def _load_extra_state(self, state: Any) -> None:
        hyper = state.get("hyper", {})
        if "d" in hyper and hyper["d"] != self.d:
            raise ValueError(f"this state dict was saved with d={hyper['d']}, this AG3 has d={self.d}")
        anchors = state.get("anchors", {})
        if self.anchors.storage == "device":  # a checkpoint loaded onto the CPU: back next to the parameters
            devices = {n: p.device for n, p in self._names().items()}
            anchors = {i: {n: t.to(devices[n]) if n in devices else t for n, t in snap.items()} for i, snap in anchors.items()}
        self.anchors.load_state_dict(anchors)

    def close(self) -> None:
        """Delete disk snapshots now (they are also deleted when the object is collected)."""
        self.anchors.close()
