"""Gradient clipping with the wrappers: a step pre-hook on the base optimizer
(``optimizer.register_step_pre_hook``) runs at every real step the wrapper makes — AG-3's and
SAM's update, AG-1/AG-2's forecast and AG-2's dry step (which then take the optimizer's own
step instead of the closed form) — so global-norm clipping bounds every update as it would a
plain step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ttadapt

LR, MAX_NORM = 0.1, 1e-3  # (a bound far below the gradient's norm: every step is clipped)


def _setup(method: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    calls = []

    def clip(optimizer, args, kwargs):
        calls.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))

    opt.register_step_pre_hook(clip)
    kwargs = {"d": 1} if method == "AG3" else {}
    wrapper = getattr(ttadapt, method)(model, opt, **kwargs)
    return model, wrapper, (lambda: F.cross_entropy(model(x), y)), calls


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("method", ["AG1", "AG2", "AG3", "SAM"])
def test_a_step_pre_hook_clips_every_update(method):
    model, wrapper, closure, calls = _setup(method)
    for step in range(3):
        before = _flat(model)
        calls.clear()
        wrapper.step(closure)
        delta = _flat(model) - before
        assert calls and all(norm > MAX_NORM for norm in calls)  # (the hook ran and had something to clip)
        if method == "AG2":  # the forecast's L1 length: that of −lr·clip(g) at θ
            continue
        # AG-1: per coordinate the forecast's magnitude, −lr·clip(g); AG-3 / SAM: −lr·clip(G)
        assert torch.linalg.vector_norm(delta).item() == pytest.approx(LR * MAX_NORM, rel=1e-4)


def test_ag2_steps_have_the_clipped_forecasts_l1_length():
    model, wrapper, closure, calls = _setup("AG2")
    for _ in range(3):
        theta = [p.detach().clone() for p in model.parameters()]
        g = torch.autograd.grad(closure(), list(model.parameters()))
        total = torch.linalg.vector_norm(torch.cat([t.flatten() for t in g]))
        forecast_l1 = sum((LR * t * (MAX_NORM / (total + 1e-6))).abs().sum() for t in g)
        wrapper.step(closure)
        step_l1 = sum((p.detach() - t).abs().sum() for p, t in zip(model.parameters(), theta))
        assert step_l1.item() == pytest.approx(forecast_l1.item(), rel=1e-4)
        assert len(calls) >= 2  # the forecast and the dry step
        calls.clear()


@pytest.mark.parametrize("method", ["AG1", "AG2"])
@pytest.mark.parametrize("base", [torch.optim.Adam, torch.optim.RMSprop])
def test_the_hook_runs_where_a_closed_form_would_skip_it(method, base):
    """Adam and RMSprop have a fused closed-form forecast and dry step, which do not call
    ``step()``: an optimizer with step hooks takes its real step there instead."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    opt = base(model.parameters(), lr=1e-2)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append(1))
    wrapper = getattr(ttadapt, method)(model, opt)
    wrapper.step(lambda: F.cross_entropy(model(x), y))
    assert len(calls) == (1 if method == "AG1" else 2)  # the forecast (and AG-2's dry step)
