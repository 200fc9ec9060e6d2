"""Test-time adaptation: a wrapper module whose call adapts the model on the batch and returns
logits (DESIGN §6: the conventions of TENT, EATA and SAR, plus averaged-gradient methods and
few-shot adaptation with labels).

    adapter = ttadapt.Adapter(model, method="ag2", optimizer="rmsprop", lr=1e-3, steps=1)
    for x in stream:
        logits = adapter(x)            # adapts on x, then predicts (predict="after")
    logits = adapter(**tokenizer(texts, return_tensors="pt", padding=True))   # keyword inputs

The adapter configures the model in place, as TENT does: only the chosen parameters require a
gradient, BatchNorm layers normalise with the test batch's statistics (their running statistics
are left as they are; a batch of one sample uses them instead), everything else runs in eval
mode (no dropout). ``reset()`` puts the
parameters, buffers and optimizer back to how they were when the adapter was made, bit for bit.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor, nn

from .optim import AG1, AG2, SAM, OptimizerSnapshot, create_optimizer
from .optim.base import all_finite
from .states import evaluated_at

__all__ = ["Adapter", "AdaptationReport", "METHODS", "LOSSES", "logits_of", "entropy", "select_parameters"]

METHODS = ("none", "norm", "grad", "ag1", "ag2", "ag1_linear", "ag2_linear", "sam")
LOSSES = ("entropy", "filtered_entropy", "ce")
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def _outside_inference(t: Any) -> Any:
    """A tensor made under ``torch.inference_mode`` as a normal tensor (a copy); anything else as it is."""
    return t.clone() if isinstance(t, Tensor) and t.is_inference() else t


def logits_of(output: Any) -> Tensor:
    """The logits of a model output: a tensor, an object with ``.logits`` (Hugging Face), a
    mapping with ``"logits"``, or the first element of a tuple."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits") and isinstance(output.logits, Tensor):
        return output.logits
    if isinstance(output, dict) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def entropy(logits: Tensor) -> Tensor:
    """Per-sample Shannon entropy of the softmax, in nats."""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


@dataclass
class AdaptationReport:
    """What happened on one batch."""

    loss_before: float | None  # the adaptation loss at the first step
    loss_after: float | None  # the adaptation loss after the last step (predict="after")
    steps: int
    rolled_back: bool = False
    reason: str = ""
    source_statistics: bool = False  # a batch of one sample: BatchNorm used its running statistics


def select_parameters(model: nn.Module, params: str | Sequence[str]) -> dict[str, Tensor]:
    """The parameters an adapter with ``params`` adapts, by name: ``"all"``, ``"norm"`` (the
    affine parameters of normalisation layers) or shell-style name patterns (one or a list)."""
    named = dict(model.named_parameters())
    if params == "all":
        return named
    if params == "norm":
        chosen = {}
        for path, m in model.named_modules():
            if isinstance(m, _NORMS):
                for pname, p in m.named_parameters(recurse=False):
                    chosen[f"{path}.{pname}" if path else pname] = p
        return chosen
    patterns = [params] if isinstance(params, str) else list(params)
    return {n: p for n, p in named.items() if any(fnmatch.fnmatch(n, pat) for pat in patterns)}


class Adapter(nn.Module):
    """Adapt ``model`` on every batch it is called with, then return logits.

    Args:
        model: any classifier (a Hugging Face output with ``.logits`` works).
        method: ``"none"`` (the source model), ``"norm"`` (BatchNorm test statistics only),
            ``"grad"`` (ordinary gradient; with ``loss="entropy"`` this is TENT), ``"ag1"``,
            ``"ag2"``, ``"ag1_linear"``, ``"ag2_linear"`` (forward-looking averaged gradients),
            ``"sam"`` (sharpness-aware; with ``filtered_entropy`` this is SAR's objective).
        optimizer: ``"rmsprop"``, ``"adam"``, ``"adamw"``, ``"sgd"``, ``"soap"``, or a factory
            ``params -> torch.optim.Optimizer``.
        lr: learning rate of the base optimizer.
        steps: update steps per batch.
        loss: ``"entropy"``; ``"filtered_entropy"`` (only samples with entropy below
            ``E0 = 0.4·ln C``, the EATA/SAR reliability filter); ``"ce"`` (cross-entropy with the
            labels passed as ``adapter(x, y)``: few-shot adaptation).
        params: ``"norm"`` (affine parameters of normalisation layers), ``"all"``, or
            shell-style name patterns (``"layer4.*"`` or a list of them).
        episodic: reset to the initial state before every batch.
        predict: ``"after"`` (default: logits of the adapted model; one extra forward) or
            ``"before"`` (logits of the forward the first update used, as TENT returns).
        collapse_guard: roll the batch back when the loss or the predictions become non-finite
            or the predictions collapse onto one class (≥ 95 % of a batch of ≥ 16 samples that
            was not collapsed before); :attr:`last_report` and a warning say so.
        rho: SAM's radius.
    """

    def __init__(self, model: nn.Module, *, method: str = "ag2", optimizer: str | Callable[[list[Tensor]], Any] = "rmsprop",
                 lr: float = 1e-3, steps: int = 1, loss: str = "entropy", params: str | Sequence[str] = "norm",
                 episodic: bool = True, predict: str = "after", collapse_guard: bool = True, rho: float = 0.05,
                 optimizer_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of: {', '.join(LOSSES)}")
        if predict not in ("after", "before"):
            raise ValueError(f"predict must be 'after' or 'before', got {predict!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        self.model = model
        self.method, self.loss, self.steps, self.episodic, self.predict = method, loss, steps, episodic, predict
        self.collapse_guard = collapse_guard
        self.last_report: AdaptationReport | None = None
        self.rolled_back = 0
        self._warned_single = False
        self.adapted = select_parameters(model, params) if method not in ("none", "norm") else {}
        if not self.adapted and method not in ("none", "norm"):  # checked before the model is touched
            hint = " (the model has no normalisation layers: use params='all' or name patterns)" if params == "norm" else ""
            raise ValueError(f"params={params!r} selects no parameters of the model{hint}")
        self._configure()
        for p in self.adapted.values():
            p.requires_grad_(True)
        self.optimizer = None
        self.wrapper = None
        if self.adapted:
            plist = list(self.adapted.values())
            self.optimizer = optimizer(plist) if callable(optimizer) else create_optimizer(optimizer, plist, lr, **(optimizer_kwargs or {}))
            if method in ("ag1", "ag1_linear"):
                self.wrapper = AG1(model, self.optimizer, linear=method.endswith("linear"))
            elif method in ("ag2", "ag2_linear"):
                self.wrapper = AG2(model, self.optimizer, linear=method.endswith("linear"))
            elif method == "sam":
                self.wrapper = SAM(model, self.optimizer, rho=rho)
        self._initial = self._capture()

    # -- configuration ------------------------------------------------------------------------
    def _configure(self) -> None:
        model = self.model
        model.eval()
        if self.method == "none":
            return
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()  # normalise with the test batch's statistics ...
                m.momentum = 0.0  # ... and leave the running statistics as they are
        for p in model.parameters():
            p.requires_grad_(False)

    # -- state ----------------------------------------------------------------------------------
    def _capture(self) -> dict[str, Any]:
        return {
            "params": {n: p.detach().clone() for n, p in self.adapted.items()},
            "buffers": {n: b.detach().clone() for n, b in self.model.named_buffers()},
            "optimizer": OptimizerSnapshot(self.optimizer) if self.optimizer is not None else None,
            "counters": (self.wrapper.step_count, self.wrapper.skipped_steps) if self.wrapper is not None else None,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for n, p in self.adapted.items():
                p.copy_(state["params"][n])
                p.grad = None
            for n, b in self.model.named_buffers():
                b.copy_(state["buffers"][n])
        if state["optimizer"] is not None:
            state["optimizer"].restore()
        if state["counters"] is not None:
            self.wrapper.step_count, self.wrapper.skipped_steps = state["counters"]

    def reset(self) -> None:
        """Back to the state the adapter was created in: parameters, buffers, optimizer."""
        self._restore(self._initial)

    # -- the objective ----------------------------------------------------------------------
    def objective(self, logits: Tensor, y: Tensor | None) -> Tensor:
        if self.loss == "ce":
            return F.cross_entropy(logits, y)
        ent = entropy(logits)
        if self.loss == "entropy":
            return ent.mean()
        reliable = ent < 0.4 * math.log(logits.shape[-1])
        if not bool(reliable.any()):
            return (ent * 0).sum()  # nothing reliable: a zero loss, no update
        return ent[reliable].mean()

    # -- the call -----------------------------------------------------------------------------
    def forward(self, x: Any = None, y: Tensor | None = None, **inputs: Any) -> Tensor:
        """Adapt on the batch, then return logits. The batch is ``x`` (called as ``model(x)``),
        keyword inputs (``adapter(input_ids=..., attention_mask=...)``, called as
        ``model(**inputs)``, after ``x`` if both are given), or a mapping ``x`` whose keys all
        name parameters of the model's ``forward`` — a tokenizer's output — unpacked the same
        way. ``y``: labels for ``loss="ce"``."""
        x = self._batch(x, inputs)
        if self.method == "none":
            self.last_report = AdaptationReport(None, None, 0)
            return self._predict(x)
        # adapting takes gradients, also when the pipeline around runs under no_grad or
        # inference_mode (as TENT's forward does); a batch made under inference_mode is copied
        # out of it (its tensors cannot enter a graph)
        with torch.inference_mode(False), torch.enable_grad():
            x, y = pytree.tree_map(_outside_inference, (x, y))
            with self._statistics_for(x) as source_statistics:
                out = self._adapt(x, y)
        if source_statistics:
            self.last_report.source_statistics = True
            if not self._warned_single:
                self._warned_single = True
                warnings.warn("ttadapt.Adapter: a batch of one sample; BatchNorm uses its running statistics for it "
                              "(adapt on batches of several samples to use test-batch statistics)", RuntimeWarning,
                              stacklevel=2)
        return out

    def _batch(self, x: Any, inputs: dict[str, Any]) -> "_Batch":
        if inputs:
            return _Batch(() if x is None else (x,), dict(inputs))
        if x is None:
            raise TypeError("the adapter needs the model's input: adapter(x) or adapter(**inputs)")
        if isinstance(x, Mapping) and _names_forward_parameters(self.model, x):
            return _Batch((), dict(x))
        return _Batch((x,), {})

    def _statistics_for(self, x: "_Batch") -> "_EvalMode":
        """A batch of one sample has no batch statistics to speak of (BatchNorm1d refuses it,
        BatchNorm2d normalises it by itself, which is how TENT-style adaptation collapses on it):
        inside this block its BatchNorm layers use their running statistics, as the source model
        does. Other batches: a block that changes nothing."""
        return _EvalMode(self._test_statistics_layers() if _batch_size(x) == 1 else [])

    def _test_statistics_layers(self) -> list[nn.Module]:
        """The BatchNorm layers that normalise with the test batch's statistics."""
        return [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]

    def _adapt(self, x: Any, y: Tensor | None) -> Tensor:
        if self.episodic:
            self.reset()
        if self.method == "norm" or self.steps == 0 or _batch_size(x) == 0:  # (an empty batch: nothing to adapt on)
            self.last_report = AdaptationReport(None, None, 0)
            return self._predict(x)
        if self.loss == "ce":
            if y is None:
                raise ValueError("loss='ce' adapts with labels: call adapter(x, y)")
            if not isinstance(y, Tensor) or y.dim() != 1:
                raise ValueError("labels must be a 1-D tensor of class indices")
        before_state = self._capture() if self.collapse_guard else None
        first: list[Tensor] = []

        def closure() -> Tensor:
            logits = logits_of(x.call(self.model))
            if not first:
                first.append(logits.detach())
            return self.objective(logits, y)

        losses = []
        skipped = self.wrapper.skipped_steps if self.wrapper is not None else 0
        for _ in range(self.steps):
            if self.wrapper is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # reported below instead
                    losses.append(float(self.wrapper.step(closure)))
            else:
                losses.append(float(self._plain_step(closure)))
        if self.predict == "after":
            out = self._predict(x)
            loss_after = float(self.objective(out, y)) if self.loss != "ce" or y is not None else None
        else:
            out, loss_after = first[0], None
        report = AdaptationReport(losses[0] if losses else None, loss_after, self.steps)
        if self.collapse_guard:
            reason = ""
            if self.wrapper is not None and self.wrapper.skipped_steps > skipped:
                reason = "non-finite loss or gradient"
            elif not all_finite(out) or (loss_after is not None and not math.isfinite(loss_after)):
                reason = "non-finite predictions"
            elif _collapsed(out) and not _collapsed(first[0]):
                reason = "predictions collapsed onto one class"
            if reason:
                self._restore(before_state)
                self.rolled_back += 1
                report.rolled_back, report.reason = True, reason
                warnings.warn(f"ttadapt.Adapter: {reason}; the batch was rolled back", RuntimeWarning, stacklevel=2)
                out = self._predict(x)
        self.last_report = report
        return out

    def predict_only(self, x: Any = None, **inputs: Any) -> Tensor:
        """Logits of the model as it is now, without adapting and without touching its buffers
        (BatchNorm's batch counter included); the batch is given as to the adapter's call."""
        return self._predict(self._batch(x, inputs))

    def _predict(self, x: "_Batch") -> Tensor:
        with torch.no_grad(), self._statistics_for(x), evaluated_at(self.model, {}, copy_buffers=True):
            return logits_of(x.call(self.model))

    def _plain_step(self, closure: Callable[[], Tensor]) -> Tensor:
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        loss = closure()
        if loss.requires_grad:
            loss.backward()
        grads = [p.grad for p in self.adapted.values()]
        if all_finite(loss, *grads):
            self.optimizer.step()
        return loss.detach()

    def extra_repr(self) -> str:
        return f"method={self.method!r}, loss={self.loss!r}, steps={self.steps}, episodic={self.episodic}, adapted={len(self.adapted)} tensors"


class _Batch:
    """A batch as the model is called with it: positional and keyword inputs."""

    def __init__(self, args: tuple, kwargs: dict[str, Any]) -> None:
        self.args, self.kwargs = args, kwargs

    def call(self, model: nn.Module) -> Any:
        return model(*self.args, **self.kwargs)


pytree.register_pytree_node(  # (so that tree_map reaches the tensors inside)
    _Batch, lambda b: ([b.args, b.kwargs], None), lambda children, _: _Batch(*children),
    serialized_type_name="ttadapt.adapt._Batch")


def _names_forward_parameters(model: nn.Module, x: Mapping) -> bool:
    """Whether every key of ``x`` names a parameter of ``model.forward`` (a tokenizer's output
    for a Hugging Face model): such a mapping is passed as keywords, any other one as it is."""
    while True:
        try:
            parameters = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            return False
        named = {n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if named or not isinstance(inner, nn.Module):
            break
        model = inner  # a pass-through wrapper, forward(*args, **kwargs): torch.compile's, DDP's
    return bool(x) and all(isinstance(k, str) and k in named for k in x)


def _batch_size(x: Any) -> int | None:
    """The leading dimension of the first tensor in ``x`` (a tensor, a batch of positional and
    keyword inputs, a mapping or a sequence)."""
    if isinstance(x, _Batch):
        x = [*x.args, *x.kwargs.values()]
    if isinstance(x, Tensor):
        return x.shape[0] if x.dim() else None
    if hasattr(x, "keys") and hasattr(x, "values"):
        items = list(x.values())
    elif isinstance(x, (list, tuple)):
        items = list(x)
    else:
        return None
    for v in items:
        if isinstance(v, Tensor) and v.dim():
            return v.shape[0]
    return None


class _EvalMode:
    """Put ``modules`` in eval mode inside the block (which gives whether there were any), back in
    train mode after it."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules

    def __enter__(self) -> bool:
        for m in self.modules:
            m.train(False)
        return bool(self.modules)

    def __exit__(self, *exc: Any) -> None:
        for m in self.modules:
            m.train(True)


def _collapsed(logits: Tensor) -> bool:
    if logits.dim() != 2 or logits.shape[0] < 16:
        return False
    counts = torch.bincount(logits.argmax(-1), minlength=logits.shape[-1])
    return float(counts.max()) >= 0.95 * logits.shape[0]

