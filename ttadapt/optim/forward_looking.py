"""AG-1 and AG-2: forward-looking averaged-gradient steps (spec §3, paper Alg. 2).

Each step, on one batch:

1. one forward at θ with a graph, one backward: the ordinary gradient g;
2. the forecast: the base optimizer's step with g gives θ′; its state advances with g and is
   kept (s ← s′), the state before it kept aside (for AG-2's dry step and for undoing the
   step) — for torch's Adam, AdamW and RMSprop on the CPU by the fused kernels of
   :mod:`ttadapt.optim.closed_form`, which write the new state into spare memory; otherwise by a
   snapshot of the state and the real ``step()``;
3. one forward at θ′ without a graph, then a second backward through the graph of step 1: the
   averaged gradient G′ between θ and θ′, graph state θ, loss gradient taken at θ′'s output;
4. AG-1: θ ← θ − |θ′ − θ| ⊙ sign(G′) — the forecast's per-coordinate magnitude, the averaged
   gradient's direction;
   AG-2: a dry run of the base optimizer from the state *before* step 2 with G′ gives θ″ (then
   discarded): for torch's Adam/AdamW/RMSprop and pytorch-optimizer's SOAP computed from that
   state without running ``step()`` (:mod:`ttadapt.optim.closed_form`,
   :mod:`ttadapt.optim.soap_step`); otherwise the real ``step()``, in which SOAP's
   preconditioner refresh, which θ″ does not depend on, is skipped when step 2 showed that
   (:mod:`ttadapt.optim.refresh`); θ ← θ + (θ″ − θ)·‖θ′ − θ‖₁/‖θ″ − θ‖₁.

Cost: 2·T_fwd + 2·T_bwd + 2·T_opt (the graph of step 1 is differentiated twice, see
:class:`ttadapt.averaged.DeferredAverage`). ``linear=True`` uses the Linear variant in step 3;
AG-2 Linear also rescales each affine layer's averaged gradients to the ordinary ones' L2 norms.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .. import kernels
from ..averaged import DeferredAverage, call_closure, explain_backward_in_closure
from ..collector import pausing_collector
from ..metrics import step_lengths
from ..states import ModelLayout, evaluated_at, fork_rng
from .base import Closure, OptimizerWrapper, all_finite
from .closed_form import FusedForecast, SpareState, dry_direction, fused_forecast
from .refresh import RefreshProbe, skipped_refresh
from .soap_step import soap_dry_step
from .snapshot import OptimizerSnapshot, SwappedState, swappable

__all__ = ["AG1", "AG2"]


class _ForwardLooking(OptimizerWrapper):
    _full_vector = False

    def __init__(self, model: nn.Module, optimizer: Any, *, linear: bool = False,
                 reduce: Callable[[list[Tensor]], None] | None = None) -> None:
        super().__init__(model, optimizer)
        self.linear = bool(linear)
        #: applied in place to the list of gradients (ordinary, then averaged) before they are
        #: used, e.g. an all-reduce mean across data-parallel ranks; the closure then calls the
        #: unwrapped module (the graph is built on private copies of the parameters, which a
        #: DistributedDataParallel reducer would not see)
        self.reduce = reduce
        # the last step's optimizer-state snapshots and copies of θ, recycled by the next step
        # (they are dead by then; copying into them is cheaper than allocating new memory)
        self._spare_snapshots: list[OptimizerSnapshot] = []
        # the moments the last fused forecast retired, written by the next (see closed_form)
        self._spare_state = SpareState()
        # whether this step's AG-2 dry step may skip the preconditioner refresh (see refresh.py)
        self._dry_skips_refresh = False
        self._spare_start: dict[str, Tensor] | None = None
        #: L1 length ‖θ′ − θ‖₁ of the last forecast step (AG-2's committed step has this length)
        self.last_forecast_l1: float | None = None
        #: loss on the last batch at the forecast θ′ — the ordinary update's result, for
        #: the batch-loss improvement metric (spec §4)
        self.last_forecast_loss: Tensor | None = None
        #: set to True to have every step record :attr:`last_lengths` (two extra passes over
        #: the parameters; off by default)
        self.record_lengths = False
        #: (L1, L2) of the forecast step θ′ − θ and (L1, L2) of the committed step, when recorded
        self.last_lengths: tuple[float, float, float, float] | None = None
        #: set to True to have every step record :attr:`last_loss_after` (one more no-graph
        #: forward; off by default)
        self.record_loss_after = False
        #: loss on the step's batch after the committed update (same dropout masks as the
        #: step's passes, BatchNorm statistics untouched); None unless recorded and not skipped.
        #: ``loss − last_loss_after`` against ``loss − last_forecast_loss`` is the spec's
        #: batch-loss decrease of the AG update and of the ordinary one of the same L1 length
        self.last_loss_after: Tensor | None = None

    def _hyper(self) -> dict[str, Any]:
        return {"linear": self.linear}

    @pausing_collector
    @torch.enable_grad()  # (a step taken under no_grad still takes its gradients, as LBFGS's does)
    @explain_backward_in_closure
    def step(self, closure: Closure) -> Tensor:
        """One update on the batch the closure evaluates; returns the loss at θ (before it)."""
        closure = self._check_closure(closure)
        layout = ModelLayout(self.model)
        params = self._names(layout)
        buffers = self._save_buffers(layout)
        self.last_loss_after = None
        masks = fork_rng(layout) if self.record_loss_after else None  # the step's dropout masks, for the loss after it
        try:
            run = DeferredAverage(self.model, closure, linear=self.linear, rescale=self._full_vector and self.linear,
                                  layout=layout, reuse=self._spare_start)
        except BaseException:
            self._restore_buffers(layout, buffers)  # (a pass that raised may have updated BatchNorm statistics)
            raise
        self._spare_start = run.start
        spares, self._spare_snapshots = self._spare_snapshots, []
        loss = run.loss
        if not all_finite(loss):
            self._spare_snapshots = spares
            self._restore_buffers(layout, buffers)
            self._skip("loss")
            return loss
        grads = run.ordinary_grad()
        if self.reduce is not None:
            self.reduce([grads[n] for n in params])
        if not all_finite(*(grads[n] for n in params)):
            self._spare_snapshots = spares
            self._restore_buffers(layout, buffers)
            self._skip("gradient")
            return loss
        theta = {n: run.start[n].detach() for n in params}  # θ (private copies: free to overwrite at the end)
        old_grads = {n: p.grad for n, p in params.items()}
        # the forecast θ′; its state is the committed one (s ← s′), the one before kept for AG-2's
        # dry step and for undoing it: fused for torch's Adam/AdamW/RMSprop on the CPU, else a
        # snapshot of the state and the real step
        before: OptimizerSnapshot | FusedForecast | None = fused_forecast(self.optimizer, params, grads, self._spare_state)
        self._dry_skips_refresh = False
        if before is None:
            before = OptimizerSnapshot(self.optimizer, reuse=spares.pop() if spares else None)
            self._spare_snapshots.append(before)
            self._set_grads(params, grads)
            if self._full_vector:  # the real step shows whether AG-2's dry step may skip SOAP's refresh
                with RefreshProbe(self.optimizer) as probe:
                    self.optimizer.step()
                self._dry_skips_refresh = probe.safe
            else:
                self.optimizer.step()
        del grads
        for p in params.values():
            p.grad = None
        averaged = run.averaged_grad(None, seed="other")  # other = the parameters as they are now: θ′
        if self.reduce is not None:
            self.reduce([averaged[n] for n in params])
        self.last_forecast_loss = run.other_loss
        with torch.no_grad():
            forecast = step_lengths([p - theta[n] for n, p in params.items()]) if self.record_lengths else None
            # the update proves G′ finite on the way (its fused passes read G′ anyway) or checks
            # it first; on False the parameters hold anything and `before` is unspent
            if self._full_vector:
                done = self._ag2_update(params, theta, averaged, before, spares)
            else:
                done = self._ag1_update(params, theta, averaged)
            if not done:
                for n, p in params.items():
                    p.copy_(theta[n])
                    p.grad = old_grads[n]
                before.restore()
                self._restore_buffers(layout, buffers)
                self._skip("averaged gradient" if not all_finite(*(averaged[n] for n in params)) else "forecast step")
                return loss
            if forecast is not None:
                self.last_lengths = (*forecast, *step_lengths([p - theta[n] for n, p in params.items()]))
        del old_grads
        self._set_grads(params, averaged)
        self.step_count += 1
        if masks is not None:
            after_step = fork_rng(layout)
            masks.rewind()
            with torch.no_grad(), evaluated_at(layout, {}, copy_buffers=True):
                self.last_loss_after = call_closure(closure).detach()
            after_step.rewind()
        return loss

    def _ag1_update(self, params: dict[str, Tensor], theta: dict[str, Tensor], averaged: dict[str, Tensor]) -> bool:
        """θ ← θ − |θ′ − θ| ⊙ sign(G′), with the parameters holding θ′: one fused pass per tensor
        where :func:`ttadapt.kernels.ag1_update` applies (all in one call where all fit), else
        four PyTorch ops. False where G′ or the forecast step is not finite (then the caller
        rolls back and skips the step): the fused passes prove it on the way; the tensors they
        do not cover are checked before their update."""
        names = list(params)
        fused = kernels.ag1_update_many([params[n] for n in names], [theta[n] for n in names], [averaged[n] for n in names])
        unfused: list[str] = []
        if fused is None:  # not every tensor fits: one call each where the kernel applies
            fused = 0.0
            for n, p in params.items():
                l1 = kernels.ag1_update(p, theta[n], averaged[n])
                if l1 is None:
                    unfused.append(n)
                else:
                    fused += l1
        if unfused and not all_finite(*(averaged[n] for n in unfused)):
            return False  # (the caller restores the parameters the fused passes wrote)
        lengths: list[Tensor] = []
        for n in unfused:
            p = params[n]
            step = p.sub_(theta[n]).abs_()  # |θ′ − θ|, in the parameter's memory
            lengths.append(step.sum())  # a plain sum of |·| is ~3x cheaper than vector_norm(·, 1)
            g = averaged[n].to_dense() if averaged[n].is_sparse else averaged[n]  # (nn.Embedding(sparse=True))
            torch.addcmul(theta[n], step, g.sign().to(p.dtype), value=-1, out=p)
        total = fused + _total(lengths)
        if not math.isfinite(total):
            return False
        self.last_forecast_l1 = total
        return True

    def _ag2_update(self, params: dict[str, Tensor], theta: dict[str, Tensor], averaged: dict[str, Tensor],
                    before: OptimizerSnapshot | FusedForecast, spares: list[OptimizerSnapshot]) -> bool:
        """θ ← θ + (θ″ − θ)·‖θ′ − θ‖₁/‖θ″ − θ‖₁, θ″ from the state before the forecast with G′;
        False (nothing committed, ``before`` unspent) where G′ is not finite.

        For torch's Adam, AdamW and RMSprop on the CPU, θ″ − θ and both L1 lengths come from
        one fused pass that only reads the saved state (:mod:`ttadapt.optim.closed_form`); for
        pytorch-optimizer's SOAP, θ″ comes from batched tensor operations that only read the
        snapshot (:mod:`ttadapt.optim.soap_step`); otherwise the base optimizer's real
        ``step()`` runs from the state before the forecast and is undone. The L1 lengths and the
        rescaled step are one fused pass per tensor each where :mod:`ttadapt.kernels` applies."""
        lengths = dry_direction(self.optimizer, before, params, theta, averaged)  # p ← θ″ − θ, fused
        if lengths is not None:
            if not (math.isfinite(lengths[0]) and math.isfinite(lengths[1])):
                return False  # a non-finite G′ makes θ″ − θ NaN (see closed_form)
            self._ag2_commit(params, theta, *lengths, set(params))
            return True
        if not all_finite(*(averaged[n] for n in params)):
            return False
        forecast_l1, _ = _l1_lengths(params, theta)  # p is overwritten next
        new = soap_dry_step(self.optimizer, before, params, theta, averaged)  # SOAP's, batched: soap_step.py
        if new is not None:
            torch._foreach_copy_(list(params.values()), list(new.values()))
        else:
            self._real_dry_step(params, theta, averaged, before, spares)
        length, differenced = _l1_lengths(params, theta)  # ‖θ″ − θ‖₁
        self._ag2_commit(params, theta, forecast_l1, length, differenced)
        return True

    def _real_dry_step(self, params: dict[str, Tensor], theta: dict[str, Tensor], averaged: dict[str, Tensor],
                       before: OptimizerSnapshot | FusedForecast, spares: list[OptimizerSnapshot]) -> None:
        """p ← θ″ by the base optimizer's real ``step()`` from the state before the forecast,
        the committed state put back afterwards."""
        if isinstance(before, OptimizerSnapshot) and swappable(self.optimizer):
            # run the dry step on the snapshot's own tensors (spent afterwards) while the
            # committed state objects wait aside: no state copied at all
            committed = before.swap_in()
        else:
            committed = OptimizerSnapshot(self.optimizer, reuse=spares.pop() if spares else None)
            self._spare_snapshots.append(committed)
            before.restore()
        torch._foreach_copy_(list(params.values()), [theta[n] for n in params])  # (one call: many small tensors)
        self._set_grads(params, averaged)
        with skipped_refresh(self.optimizer, self._dry_skips_refresh):  # (θ″ does not depend on it: refresh.py)
            self.optimizer.step()  # dry run from the state before the forecast, with G′
        if isinstance(committed, SwappedState):
            committed.put_back()
        else:
            committed.restore()

    def _ag2_commit(self, params: dict[str, Tensor], theta: dict[str, Tensor], forecast_l1: float, length: float,
                    differenced: set[str]) -> None:
        """θ ← θ + (θ″ − θ)·‖θ′ − θ‖₁/‖θ″ − θ‖₁, with ``p`` holding θ″ − θ for the names in
        ``differenced`` and θ″ for the others."""
        scale = forecast_l1 / length if length > 0 else 0.0
        # all of them in one kernel call where they all hold θ″ − θ (or all θ″) and fit, else one op each
        ps, thetas = list(params.values()), [theta[n] for n in params]
        if not ((len(differenced) == len(params) and kernels.ag2_commit_many(ps, thetas, scale))
                or (not differenced and kernels.ag2_rescale_many(ps, thetas, scale))):
            for n, p in params.items():
                if n in differenced:  # p holds θ″ − θ
                    torch.add(theta[n], p, alpha=scale, out=p)
                else:
                    kernels.ag2_rescale(p, theta[n], scale)
        self.last_forecast_l1 = forecast_l1


def _l1_lengths(params: dict[str, Tensor], theta: dict[str, Tensor]) -> tuple[float, set[str]]:
    """``Σ‖p − θ‖₁`` over the parameters — one read-only fused pass per tensor where
    :func:`ttadapt.kernels.l1_diff` applies — and the names of the other tensors, whose ``p``
    now holds ``p − θ``."""
    names = list(params)
    total = kernels.l1_diff_many([params[n] for n in names], [theta[n] for n in names])  # all in one call where all fit
    if total is not None:
        return total, set()
    total = 0.0
    differenced: list[str] = []
    parts: list[Tensor] = []
    for n, p in params.items():
        l1 = kernels.l1_diff(p, theta[n])
        if l1 is None:
            differenced.append(n)
            # summed in float64: a float32 ord-1 norm (torch._foreach_norm) is off by ~2e-3
            # relative over 11M elements, the length AG-2 matches to 1e-6
            parts.append(p.sub_(theta[n]).abs().sum(dtype=torch.float64))
        else:
            total += l1
    return total + _total(parts), set(differenced)


def _total(parts: list[Tensor]) -> float:
    """Σ of per-tensor norms, in float64 (one host synchronisation)."""
    if not parts:
        return 0.0
    return float(torch.stack([t.to(torch.float64) for t in parts]).sum())


class AG1(_ForwardLooking):
    """AG-1: the forecast's step magnitude per coordinate, the averaged gradient's sign.

    Args:
        model: the model the closure evaluates.
        optimizer: the base optimizer over (some of) ``model``'s parameters.
        linear: AG-1 Linear (Linear variant of the averaged backward for affine layers).

    ``step(closure)`` returns the loss at the parameters before the update. After it, ``.grad``
    holds the averaged gradient G′ (the base optimizer's state advanced with the ordinary one).
    """


class AG2(_ForwardLooking):
    """AG-2: the base optimizer's step with the averaged gradient, scaled to the forecast's L1
    length (two dry runs of the base optimizer per step). ``linear=True`` is AG-2 Linear, with
    the per-layer rescaling of the averaged gradients to the ordinary gradients' L2 norms."""

    _full_vector = True
