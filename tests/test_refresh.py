"""AG-2's dry step without SOAP's preconditioner refresh (ttadapt.optim.refresh): the same
trajectory bit for bit as with it, taken only where the real step showed that the refresh comes
after each parameter's update."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ttadapt
import ttadapt.optim.forward_looking as forward_looking
import ttadapt.optim.refresh as refresh


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def _batches(n: int):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g)) for _ in range(n)]


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return []


def _run(make_opt, steps: int, monkeypatch: pytest.MonkeyPatch, skip: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """Parameters and optimizer-state tensors after ``steps`` AG-2 steps, and how many refreshes
    ran, with AG-2's real dry step (SOAP's closed form of it, tests/test_soap_step.py, off)."""
    monkeypatch.setattr(forward_looking, "soap_dry_step", lambda *args: None)
    if not skip:
        monkeypatch.setattr(refresh, "_REFRESH_METHODS", {})
    model = _model()
    opt = make_opt(model.parameters())
    calls = [0]
    name = "update_pre_conditioner" if hasattr(opt, "update_pre_conditioner") else "refresh"
    real = getattr(type(opt), name)

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(opt), name, counted)
    wrapper = ttadapt.AG2(model, opt)
    for x, y in _batches(steps):
        wrapper.step(lambda: F.cross_entropy(model(x), y))
    monkeypatch.undo()
    state = [t for p in model.parameters() for t in _tensors(opt.state[p])]
    return [p.detach().clone() for p in model.parameters()], state, calls[0]


@pytest.mark.parametrize("which", ["library", "ttadapt"])
def test_soap_ag2_trajectory_is_the_same_without_the_dry_refresh(which: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """25 AG-2 steps with SOAP (eigenbases refreshed every 3 steps): parameters and every state
    tensor (moments, Kronecker factors, eigenbases) bit for bit, with about half the refreshes —
    pytorch-optimizer's class (each parameter refreshed through the method) and ttadapt's
    batched one (its three biases refreshed in the batch, the matrices through the method)."""
    from pytorch_optimizer import SOAP

    if which == "library":
        make = lambda p: SOAP(p, lr=1e-2, precondition_frequency=3, merge_dims=False)  # noqa: E731
    else:
        make = lambda p: ttadapt.SOAP(p, lr=1e-2, precondition_frequency=3)  # noqa: E731
    _run(make, 2, monkeypatch, skip=True)  # (the batched step's one-time check steps scratch optimizers: not counted)
    fast, fast_state, fast_calls = _run(make, 25, monkeypatch, skip=True)
    full, full_state, full_calls = _run(make, 25, monkeypatch, skip=False)
    assert all(torch.equal(a, b) for a, b in zip(fast, full, strict=True))
    assert len(fast_state) == len(full_state) and all(torch.equal(a, b) for a, b in zip(fast_state, full_state))
    through_method = 6 if which == "library" else 3  # (the first dry step's init aside)
    assert 0 < fast_calls < full_calls and full_calls - fast_calls >= 24 * through_method


class Refreshing(torch.optim.Optimizer):
    """A toy preconditioned optimizer: each parameter's step is scaled by a running mean of |g|
    that ``refresh`` updates — after the update (``order="after"``, as SOAP) or before it."""

    def __init__(self, params, lr: float = 0.1, order: str = "after") -> None:
        super().__init__(params, {"lr": lr})
        self.order = order

    def refresh(self, grad: torch.Tensor, state: dict) -> None:
        state["scale"].mul_(0.5).add_(grad.abs(), alpha=0.5)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["scale"] = torch.ones_like(p)
                if self.order == "before":
                    self.refresh(p.grad, state)
                p.add_(p.grad / (state["scale"] + 0.1), alpha=-group["lr"])
                if self.order == "after":
                    self.refresh(p.grad, state)


@pytest.mark.parametrize("order", ["after", "before"])
def test_the_skip_is_taken_only_where_the_order_allows_it(order: str, monkeypatch: pytest.MonkeyPatch) -> None:
    key = (Refreshing.__module__, "Refreshing")
    monkeypatch.setattr(refresh, "_REFRESH_METHODS", {key: "refresh"})
    make = lambda p: Refreshing(p, order=order)  # noqa: E731
    params, state, calls = _run(make, 6, monkeypatch, skip=True)
    monkeypatch.setattr(refresh, "_REFRESH_METHODS", {key: "refresh"})
    full_params, full_state, full_calls = _run(make, 6, monkeypatch, skip=False)
    assert all(torch.equal(a, b) for a, b in zip(params, full_params, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(state, full_state, strict=True))
    if order == "after":
        assert calls == full_calls // 2  # the dry steps refreshed nothing
    else:
        assert calls == full_calls  # refresh before the update: the probe said no, the dry steps ran it


def test_forcing_the_skip_where_the_refresh_comes_first_would_change_the_step() -> None:
    """The check matters: with the refresh before the update, a dry step without it gives
    another θ″."""
    model = _model()
    opt = Refreshing(model.parameters(), order="before")
    x, y = _batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    twin, twin_opt = copy.deepcopy(model), None
    twin_opt = Refreshing(twin.parameters(), order="before")
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    opt.step()
    key = (Refreshing.__module__, "Refreshing")
    saved = dict(refresh._REFRESH_METHODS)
    refresh._REFRESH_METHODS[key] = "refresh"
    try:
        with refresh.RefreshProbe(twin_opt) as probe:
            pass
        assert not probe.safe  # nothing observed: no skip
        with refresh.skipped_refresh(twin_opt, True):
            twin_opt.step()
    finally:
        refresh._REFRESH_METHODS.clear()
        refresh._REFRESH_METHODS.update(saved)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    assert "refresh" not in vars(twin_opt)  # the instance is left as it was
