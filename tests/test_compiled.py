"""Models (and parts of them) compiled with ``torch.compile``: the averaged passes run their
code eagerly, so every activation is averaged — the same results as the uncompiled model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ttadapt

pytestmark = pytest.mark.skipif(not hasattr(torch.compiler, "set_stance"), reason="torch.compiler.set_stance needs PyTorch 2.6")


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.fixture(scope="module")
def compiled():
    """(the model compiled with the default backend, a batch); compiled once (its C++ build
    takes seconds). Each test loads fresh weights into it and into an eager twin."""
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    return torch.compile(_model()), x, y


def _twins(compiled):
    cmodel, x, y = compiled
    model = _model()
    cmodel._orig_mod.load_state_dict(model.state_dict())
    return model, cmodel, x, y


def _prefixed(state):
    return {f"_orig_mod.{k}": v for k, v in state.items()}


def test_averaged_grad_of_a_compiled_model_is_the_eager_models(compiled):
    model, cmodel, x, y = _twins(compiled)
    other = {n: p.detach() + 0.3 * torch.randn_like(p) for n, p in model.named_parameters()}
    want = ttadapt.averaged_grad(model, lambda: F.cross_entropy(model(x), y), other)
    got = ttadapt.averaged_grad(cmodel, lambda: F.cross_entropy(cmodel(x), y), _prefixed(other))
    for name, g in want.items():
        assert torch.equal(got[f"_orig_mod.{name}"], g), name
    ordinary = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    assert not all(torch.allclose(a, b) for a, b in zip(want.values(), ordinary))  # (the states differ: so do the gradients)


@pytest.mark.parametrize("method", ["AG1", "AG2"])
def test_forward_looking_steps_on_a_compiled_model_equal_the_eager_models(compiled, method):
    model, cmodel, x, y = _twins(compiled)
    params = {}
    for m in (model, cmodel):
        wrapper = getattr(ttadapt, method)(m, torch.optim.RMSprop(m.parameters(), lr=1e-2))
        for _ in range(3):
            wrapper.step(lambda m=m: F.cross_entropy(m(x), y))
        params[m is cmodel] = [p.detach().clone() for p in m.parameters()]
    for a, b in zip(params[False], params[True]):
        assert torch.equal(a, b)


def test_ag3_on_a_compiled_model_follows_the_eager_model(compiled):
    """Step 0 is a plain step (the compiled code runs compiled: its roundings); the averaged
    steps after it run eagerly."""
    model, cmodel, x, y = _twins(compiled)
    params = {}
    for m in (model, cmodel):
        wrapper = ttadapt.AG3(m, torch.optim.Adam(m.parameters(), lr=1e-2), d=1)
        for _ in range(4):
            wrapper.step(lambda m=m: F.cross_entropy(m(x), y))
        params[m is cmodel] = [p.detach().clone() for p in m.parameters()]
    start = [p.detach() for p in _model().parameters()]
    for a, b, s in zip(params[False], params[True], start):
        assert torch.allclose(a, b, rtol=0, atol=1e-5)
        assert not torch.equal(a, s)


def test_compiled_submodule_and_inspect(compiled):
    model, _, x, y = _twins(compiled)
    twin = copy.deepcopy(model)
    twin[1] = torch.compile(twin[1])
    other = {n: p.detach() + 0.3 * torch.randn_like(p) for n, p in model.named_parameters()}
    want = ttadapt.averaged_grad(model, lambda: F.cross_entropy(model(x), y), other)
    got = ttadapt.averaged_grad(twin, lambda: F.cross_entropy(twin(x), y), other)
    for name, g in want.items():
        assert torch.equal(got[name], g), name
    report = ttadapt.inspect(torch.compile(copy.deepcopy(model)), x)
    assert [c.call for c in report.calls if c.averaged] == ["tanh", "relu"]
