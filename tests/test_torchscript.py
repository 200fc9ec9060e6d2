"""TorchScript modules (``torch.jit.script`` / ``trace``) run their code outside Python, where no
activation call can be intercepted. The passes used to crash on them with an AttributeError, and
one pass deleted a traced model's compiled ``forward``. Now the model is left intact, activations
inside TorchScript keep their ordinary derivative with one warning, and ``inspect`` lists them
as not averaged; TorchScript parts without activations change nothing."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ttadapt
from conftest import batch_and_other

pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning"), pytest.mark.usefixtures("fresh_ttadapt_warnings")]


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def _scripted(kind: str, x: torch.Tensor) -> nn.Module:
    model = _model()
    if kind == "script":
        return torch.jit.script(model)
    if kind == "trace":
        return torch.jit.trace(model, x)
    model[1] = torch.jit.script(model[1])  # "submodule": only the tanh
    return model


@pytest.mark.parametrize("kind,where,ops", [("script", "'(the model)'", "tanh, relu"), ("trace", "'(the model)'", "tanh, relu"),
                                            ("submodule", "'1'", "tanh")])
def test_scripted_activations_keep_their_ordinary_derivative_with_a_warning(kind, where, ops):
    eager = _model()
    x, y, other = batch_and_other(eager)
    model = _scripted(kind, x)
    before = model(x).detach()
    with pytest.warns(RuntimeWarning, match=re.escape(f"TorchScript module {where} calls {ops};")):
        got = ttadapt.averaged_grad(model, lambda: F.cross_entropy(model(x), y), other)
    assert torch.equal(model(x), before)  # the model is intact (a traced one used to lose its forward)
    if kind != "submodule":
        assert model.inlined_graph is not None
        # nothing averaged: the ordinary gradient at the current parameters (graph and seed state)
        want = dict(zip([n for n, _ in eager.named_parameters()],
                        torch.autograd.grad(F.cross_entropy(eager(x), y), list(eager.parameters()))))
    else:  # the relu outside TorchScript is averaged: as a model whose tanh is not an activation site
        class _OrdinaryTanh(nn.Module):
            def forward(self, u):
                return _PlainTanh.apply(u)

        twin = _model()
        twin[1] = _OrdinaryTanh()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # (ttadapt's warning about the custom Function)
            want = ttadapt.averaged_grad(twin, lambda: F.cross_entropy(twin(x), y), other)
    for name, g in want.items():
        assert torch.allclose(got[name], g, rtol=1e-6, atol=1e-7), name


class _PlainTanh(torch.autograd.Function):
    """tanh with its ordinary derivative, hidden from the passes (as TorchScript hides it)."""

    @staticmethod
    def forward(ctx, u):
        y = torch.tanh(u)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


@pytest.mark.parametrize("kind", ["script", "trace", "submodule"])
def test_inspect_lists_scripted_activations_as_not_averaged(kind):
    x, _, _ = batch_and_other(_model())
    report = ttadapt.inspect(_scripted(kind, x), x)
    rows = [(c.call, c.averaged) for c in report.calls]
    if kind == "submodule":
        assert rows == [("tanh (TorchScript)", False), ("relu", True)]
        assert report.calls[0].module == "1"
    else:
        assert rows == [("tanh (TorchScript)", False), ("relu (TorchScript)", False)]


def test_scripted_parts_without_activations_change_nothing():
    eager = _model()
    x, y, other = batch_and_other(eager)
    model = copy.deepcopy(eager)
    model[0] = torch.jit.script(model[0])
    model[2] = torch.jit.trace(model[2], torch.randn(3, 16))
    want = ttadapt.averaged_grad(eager, lambda: F.cross_entropy(eager(x), y), other)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = ttadapt.averaged_grad(model, lambda: F.cross_entropy(model(x), y), other)
    for name, g in want.items():
        assert torch.equal(got[name], g), name
    assert all(c.averaged for c in ttadapt.inspect(model, x).calls)
