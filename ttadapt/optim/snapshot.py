"""Bit-exact snapshots of an optimizer's state, for forecasts by dry run (spec §3, DESIGN §5).

AG-1 / AG-2 read the base optimizer's update by running its real ``step()`` and then putting
everything back: per-parameter state (moments, step counters, SOAP's eigenbases), ``param_groups``
entries other than the parameters (learning rate, betas, pytorch-optimizer's ``group["step"]``),
scalar attributes, and the same for optimizers nested inside wrapper optimizers (Lookahead's
``optimizer``, SAM-style ``base_optimizer``). Tensors are restored with in-place ``copy_`` so
that references held elsewhere (fused kernels, schedulers) stay valid; state the dry run created
is deleted. A snapshot can be restored any number of times.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import Tensor

__all__ = ["OptimizerSnapshot", "SwappedState", "dry_run", "swappable"]

_NESTED = ("optimizer", "base_optimizer", "inner_optimizer", "_optimizer")
_SKIP_ATTRS = {"param_groups", "state", "defaults", *_NESTED}
#: the module of ttadapt's batched SOAP, under whatever name this package was imported
#: (``benchmarks/ab_versions.py`` imports an older copy of it beside the working tree's)
BATCHED_SOAP_MODULE = __name__.rsplit(".", 1)[0] + ".soap_batched"


# Values that copy.deepcopy returns as they are: no copy needed, and the check is a set lookup
# (an optimizer's state holds many of them: step counts, SOAP's settings per parameter).
_ATOMIC = frozenset({int, float, bool, complex, str, bytes, type(None)})


def _clone(x: Any) -> Any:
    if type(x) in _ATOMIC:
        return x
    if isinstance(x, Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clone(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_clone(v) for v in x)
    return copy.deepcopy(x)


def _clone_into(x: Any, old: Any, copies: tuple[list[Tensor], list[Tensor]]) -> Any:
    """:func:`_clone`, writing tensors into ``old``'s same-layout tensors where it has them (a
    previous snapshot being recycled: no allocation, no page faults). Those writes are left in
    ``copies`` (destinations, sources) for one batched copy (:func:`_copy_all`)."""
    if type(x) in _ATOMIC:
        return x
    if isinstance(x, Tensor):
        if isinstance(old, Tensor) and _same_layout(old, x):
            copies[0].append(old)
            copies[1].append(x)  # (read under no_grad in _copy_all: no detach needed)
            return old
        return x.detach().clone()
    if isinstance(x, dict):
        old = old if isinstance(old, dict) else {}
        return {k: _clone_into(v, old.get(k), copies) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        old = old if isinstance(old, (list, tuple)) and len(old) == len(x) else [None] * len(x)
        items = [_clone_into(v, o, copies) for v, o in zip(x, old)]
        return items if isinstance(x, list) else tuple(items)
    return copy.deepcopy(x)


def _copy_all(copies: tuple[list[Tensor], list[Tensor]]) -> None:
    """``dst.copy_(src)`` for each pair, as one multi-tensor call (an optimizer's state is many
    small tensors: one call each costs more than the copying)."""
    if copies[0]:
        with torch.no_grad():
            torch._foreach_copy_(copies[0], copies[1])


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return (a.shape == b.shape and a.dtype is b.dtype and a.stride() == b.stride()
            and ((a.is_cpu and b.is_cpu) or a.device == b.device))


def _restore(live: Any, saved: Any) -> Any:
    """Make ``live`` equal to ``saved``, in place where possible; return the restored value."""
    if type(saved) in _ATOMIC:
        return saved
    if isinstance(saved, Tensor):
        if isinstance(live, Tensor) and _same_layout(live, saved):
            with torch.no_grad():
                live.copy_(saved)
            return live
        return saved.clone()
    if isinstance(saved, dict):
        if not isinstance(live, dict):
            return _clone(saved)
        for k in [k for k in live if k not in saved]:
            del live[k]
        for k, v in saved.items():
            live[k] = _restore(live.get(k), v)
        return live
    if isinstance(saved, list):
        if not isinstance(live, list):
            return _clone(saved)
        restored = [_restore(live[i] if i < len(live) else None, v) for i, v in enumerate(saved)]
        live[:] = restored
        return live
    if isinstance(saved, tuple):
        return tuple(_restore(None, v) for v in saved)
    return copy.deepcopy(saved)


def _plain_attr(value: Any) -> bool:
    return isinstance(value, (bool, int, float, Tensor)) or value is None


def _optimizers(optimizer: Any) -> list[Any]:
    """``optimizer`` and every optimizer nested in it (wrapper optimizers), each once."""
    found: list[Any] = []
    stack = [optimizer]
    while stack:
        opt = stack.pop()
        if any(opt is f for f in found):
            continue
        found.append(opt)
        for attr in _NESTED:
            inner = getattr(opt, attr, None)
            if inner is not None and hasattr(inner, "param_groups") and hasattr(inner, "state"):
                stack.append(inner)
    return found


class OptimizerSnapshot:
    """Everything a ``step()`` of ``optimizer`` can change, except the parameters themselves.

    ``reuse``: an older snapshot of the same optimizer that is no longer needed; its tensors
    receive the new copies where their layouts match (the wrappers recycle last step's snapshots
    so that a step allocates no new optimizer-state copies).
    """

    def __init__(self, optimizer: Any, reuse: "OptimizerSnapshot | None" = None) -> None:
        self.parts = []
        old_parts = {id(part[0]): part for part in reuse.parts} if reuse is not None else {}
        for opt in _optimizers(optimizer):
            old = old_parts.get(id(opt))
            old_state = old[1] if old is not None else {}
            copies: tuple[list[Tensor], list[Tensor]] = ([], [])
            state = {p: _clone_into(s, old_state.get(p), copies) for p, s in opt.state.items()}
            _copy_all(copies)
            groups = [{k: _clone(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
            attrs = {k: _clone(v) for k, v in vars(opt).items() if k not in _SKIP_ATTRS and not k.startswith("__") and _plain_attr(v)}
            self.parts.append((opt, state, groups, attrs))

    def swap_in(self) -> SwappedState:
        """Install this snapshot's state objects as the optimizer's state — no copying — and
        return what the optimizer held. A ``step()`` then runs from the captured state and
        writes into this snapshot's tensors (the snapshot is spent: recycle it with ``reuse=``);
        :meth:`SwappedState.put_back` reinstates the optimizer's own state objects. Only for
        optimizers that look their state up on every step (:func:`swappable`)."""
        parts = []
        swapped: set[int] = set()  # nested optimizers may share one state dict: swap it once
        for opt, state, groups, attrs in self.parts:
            live = None
            if id(opt.state) not in swapped:
                swapped.add(id(opt.state))
                live = dict(opt.state)
                opt.state.clear()
                opt.state.update(state)
            versions = [(t, t._version) for entry in (live or {}).values() for t in _tensors(entry)]
            live_groups = [{k: _clone(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
            live_attrs = {k: _clone(getattr(opt, k, None)) for k in attrs}
            parts.append((opt, live, live_groups, live_attrs, versions))
            _restore_settings(opt, groups, attrs)
        return SwappedState(parts)

    def restore(self) -> None:
        """Put the optimizer back into the captured state, bit for bit."""
        for opt, state, groups, attrs in self.parts:
            for p in [p for p in opt.state if p not in state]:
                del opt.state[p]
            for p, saved in state.items():
                if p in opt.state:
                    opt.state[p] = _restore(opt.state[p], saved)
                else:
                    opt.state[p] = _clone(saved)
            _restore_settings(opt, groups, attrs)


def _restore_settings(opt: Any, groups: list[dict], attrs: dict[str, Any]) -> None:
    """Put back ``param_groups`` entries (other than the parameters) and plain attributes."""
    for group, saved in zip(opt.param_groups, groups):
        for k in [k for k in group if k != "params" and k not in saved]:
            del group[k]
        for k, v in saved.items():
            group[k] = _restore(group.get(k), v)
    for k, v in attrs.items():
        setattr(opt, k, _restore(getattr(opt, k, None), v))


def _tensors(x: Any) -> list[Tensor]:
    """Every tensor inside a state entry (dicts, lists, tuples)."""
    found: list[Tensor] = []
    _collect_tensors(x, found)
    return found


def _collect_tensors(x: Any, found: list[Tensor]) -> None:
    if type(x) in _ATOMIC:
        return
    if isinstance(x, Tensor):
        found.append(x)
    elif isinstance(x, dict):
        for v in x.values():
            _collect_tensors(v, found)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _collect_tensors(v, found)


def swappable(optimizer: Any) -> bool:
    """Whether :meth:`OptimizerSnapshot.swap_in` is safe: every (nested) optimizer is one of
    ``torch.optim``'s or ``pytorch_optimizer``'s (ttadapt's batched SOAP among them), which look
    their state up in ``state[p]`` on every ``step()`` instead of holding on to the tensors."""
    return all(type(opt).__module__.startswith(("torch.optim.", "pytorch_optimizer.", BATCHED_SOAP_MODULE))
               for opt in _optimizers(optimizer))


class SwappedState:
    """What :meth:`OptimizerSnapshot.swap_in` took out of the optimizer; :meth:`put_back`
    reinstates it — the same objects, untouched."""

    def __init__(self, parts: list) -> None:
        self.parts = parts

    def put_back(self) -> None:
        for opt, state, groups, attrs, versions in reversed(self.parts):
            if state is not None:
                opt.state.clear()
                opt.state.update(state)
            _restore_settings(opt, groups, attrs)
            changed = [t for t, v in versions if t._version != v]
            if changed:
                raise RuntimeError(
                    f"{type(opt).__name__} wrote into optimizer state it was not given during a dry run (it keeps "
                    "references to its state tensors); its state is no longer exact"
                )


def _params(optimizer: Any) -> list[Tensor]:
    seen: dict[int, Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            seen.setdefault(id(p), p)
    return list(seen.values())


def dry_run(optimizer: Any, grads: dict[Tensor, Tensor | None] | None = None, params: Iterable[Tensor] | None = None) -> dict[Tensor, Tensor]:
    """The parameters one ``optimizer.step()`` would produce, with everything restored after.

    ``grads`` maps parameters to the gradient to step with (default: their current ``.grad``).
    Returns ``{parameter: new value}``; parameters, their ``.grad`` and the optimizer's state are
    left bit for bit as they were. No LR scheduler is stepped.
    """
    params = list(params) if params is not None else _params(optimizer)
    snapshot = OptimizerSnapshot(optimizer)
    values = [p.detach().clone() for p in params]
    old_grads = [p.grad for p in params]
    try:
        if grads is not None:
            for p in params:
                p.grad = grads.get(p)
        optimizer.step()
        return {p: p.detach().clone() for p in params}
    finally:
        with torch.no_grad():
            for p, v, g in zip(params, values, old_grads):
                p.copy_(v)
                p.grad = g
        snapshot.restore()
