"""Activations inside a custom ``torch.autograd.Function`` (memory-efficient Swish as
efficientnet_pytorch and timm's ``*Me`` layers write it) run with gradient recording off, and the
Function's own backward gives their gradient: the averaged backward cannot replace it. They
used to pass for averaged (``inspect`` said "all averaged"); now ``inspect`` lists them as not
averaged, an averaged pass warns once per Function class, and registering the calling module as
one activation averages it."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ttadapt
from conftest import batch_and_other

pytestmark = pytest.mark.usefixtures("fresh_ttadapt_warnings")


class _SwishFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return g * (s * (1 + x * (1 - s)))


class _MemoryEfficientSwish(nn.Module):
    def forward(self, x):
        return _SwishFunction.apply(x)


class _NoGradBranch(nn.Module):
    """A model that computes a side quantity under no_grad (no gradient is taken there)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        with torch.no_grad():
            scale = torch.sigmoid(h).mean()
        return self.b(h) * scale


def _models():
    torch.manual_seed(0)
    me = nn.Sequential(nn.Linear(8, 16), _MemoryEfficientSwish(), nn.Linear(16, 4))
    silu = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 4))
    silu.load_state_dict(me.state_dict())
    return me, silu


def test_inspect_lists_activations_inside_a_custom_function_as_not_averaged():
    me, _ = _models()
    x, _, _ = batch_and_other(me)
    report = ttadapt.inspect(me, x)
    assert [(c.call, c.averaged, c.grad_off) for c in report.calls] == [("sigmoid", False, True)]
    assert "1 NOT averaged" in str(report) and "sigmoid (grad off)" in str(report)
    side = _NoGradBranch()
    report = ttadapt.inspect(side, x)
    assert [(c.call, c.averaged) for c in report.calls] == [("tanh", True), ("sigmoid", False)]


def test_an_averaged_pass_warns_once_per_function_class():
    me, silu = _models()
    x, y, other = batch_and_other(me)
    closure = lambda: F.cross_entropy(me(x), y)  # noqa: E731
    with pytest.warns(RuntimeWarning, match="_SwishFunction"):
        got = ttadapt.averaged_grad(me, closure, other)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ttadapt.averaged_grad(me, closure, other)  # (once per class)
    # what the user gets: the Function's own (ordinary) derivative at that site, not the secant
    want = ttadapt.averaged_grad(silu, lambda: F.cross_entropy(silu(x), y), other)
    assert not torch.allclose(got["0.weight"], want["0.weight"], atol=1e-4)


def test_no_warning_without_a_custom_function():
    side = _NoGradBranch()
    x, y, other = batch_and_other(side)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ttadapt.averaged_grad(side, lambda: F.cross_entropy(side(x), y), other)
        wrapper = ttadapt.AG3(side, torch.optim.SGD(side.parameters(), lr=0.1), d=1)
        for _ in range(2):
            wrapper.step(lambda: F.cross_entropy(side(x), y))


def test_registering_the_module_averages_it():
    me, silu = _models()
    x, y, other = batch_and_other(me)
    ttadapt.register_module_activation("memory_efficient_swish", _MemoryEfficientSwish)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = ttadapt.averaged_grad(me, lambda: F.cross_entropy(me(x), y), other)
        report = ttadapt.inspect(me, x)
    finally:
        ttadapt.unregister_activation(_MemoryEfficientSwish)
    want = ttadapt.averaged_grad(silu, lambda: F.cross_entropy(silu(x), y), other)
    for name, g in want.items():
        assert torch.allclose(got[name], g, rtol=1e-5, atol=1e-7), name
    assert [(c.call, c.averaged) for c in report.calls] == [("memory_efficient_swish", True)]
