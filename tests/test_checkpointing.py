"""Activation checkpointing (``torch.utils.checkpoint``) computes the checkpointed activations
again during the backward, out of the averaged pass's reach: with ordinary derivatives, the
"averaged" gradient was silently the wrong one. Now every averaged pass refuses it with a clear
error and leaves the model as it was; checkpointing around parts without activations, and
saved-tensor hooks of other kinds (offloading), still run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import ttadapt
from ttadapt.sites import RecomputedActivationsError


class _Checkpointed(nn.Module):
    def __init__(self, reentrant: bool, around: str = "block") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 4)
        self.reentrant, self.around = reentrant, around

    def forward(self, x):
        if self.around == "block":
            h = checkpoint(self.block, x, use_reentrant=self.reentrant)
            return self.head(h)
        h = self.block(x)
        return checkpoint(self.head, h, use_reentrant=self.reentrant) if self.around == "head" else self.head(h)


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 8, generator=g, requires_grad=True), torch.randint(0, 4, (32,), generator=g)


def _other(model):
    g = torch.Generator().manual_seed(2)
    return {n: p.detach() + 0.3 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("seed", ["current", "other"])
def test_averaged_grad_refuses_checkpointed_activations(reentrant, seed):
    model = _Checkpointed(reentrant)
    x, y = _batch()
    with pytest.raises(RecomputedActivationsError, match="checkpointing_disable"):
        ttadapt.averaged_grad(model, lambda: F.cross_entropy(model(x), y), _other(model), seed=seed)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("method", ["AG1", "AG2", "AG3"])
def test_wrappers_refuse_it_and_leave_the_model_as_it_was(reentrant, method):
    model = _Checkpointed(reentrant)
    x, y = _batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    wrapper = getattr(ttadapt, method)(model, opt, **({"d": 1} if method == "AG3" else {}))
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    if method == "AG3":
        wrapper.step(closure)  # step 0 is a plain step (anchored at itself): checkpointing is fine there
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: {s: t.clone() if isinstance(t, torch.Tensor) else t for s, t in v.items()} for k, v in opt.state.items()}
    with pytest.raises(RecomputedActivationsError):
        wrapper.step(closure)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # parameters and BatchNorm statistics
    for k, v in opt.state.items():
        for s, t in v.items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(state[k][s]))


def test_checkpointing_without_activations_inside_still_averages():
    """(Non-reentrant: PyTorch's reentrant checkpoint does not work with ``torch.autograd.grad``.)"""
    model = _Checkpointed(False, around="head")
    plain = _Checkpointed(False, around="none")
    x, y = _batch()
    other = _other(model)
    want = ttadapt.averaged_grad(plain, lambda: F.cross_entropy(plain(x), y), other)
    got = ttadapt.averaged_grad(model, lambda: F.cross_entropy(model(x), y), other)
    for name, g in want.items():
        assert torch.allclose(got[name], g, rtol=1e-6, atol=1e-7), name


def test_offloading_hooks_still_run():
    """``save_on_cpu`` packs saved tensors and gives them back: nothing is recomputed."""
    model = _Checkpointed(False, around="none")
    x, y = _batch()
    other = _other(model)
    want = ttadapt.averaged_grad(model, lambda: F.cross_entropy(model(x), y), other)
    with torch.autograd.graph.save_on_cpu():
        got = ttadapt.averaged_grad(model, lambda: F.cross_entropy(model(x), y), other)
    for name, g in want.items():
        assert torch.equal(got[name], g), name


def test_hugging_face_gradient_checkpointing_is_refused():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).train()
    on, off = (("activation_checkpointing_enable", "activation_checkpointing_disable")
               if hasattr(model, "activation_checkpointing_enable") else
               ("gradient_checkpointing_enable", "gradient_checkpointing_disable"))  # (transformers 5 renamed them)
    getattr(model, on)()
    ids = torch.randint(0, 64, (4, 12))
    labels = torch.tensor([0, 1, 0, 1])
    closure = lambda: model(input_ids=ids, labels=labels).loss  # noqa: E731
    other = _other(model)
    with pytest.raises(RecomputedActivationsError):
        ttadapt.averaged_grad(model, closure, other)
    getattr(model, off)()
    ttadapt.averaged_grad(model, closure, other)
