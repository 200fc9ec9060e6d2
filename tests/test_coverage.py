"""Coverage on models users bring: every pointwise call averaged, and the averaged gradient
actually differs from the ordinary one when the states differ."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ttadapt

from conftest import rel_err


class FunctionalNet(nn.Module):
    """Activations called functionally, as methods and in place — no activation modules."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 12)
        self.b = nn.Linear(12, 12)
        self.c = nn.Linear(12, 12)
        self.d = nn.Linear(12, 3)

    def forward(self, x):
        h = F.gelu(self.a(x))
        h = torch.tanh(self.b(h)) + h.sigmoid()
        h = self.c(h)
        F.silu(h, inplace=True)  # result ignored: the in-place semantics must hold
        h = F.leaky_relu(h, 0.1) * torch.sigmoid(h)
        return self.d(h.relu_())


def _check(model, inputs, closure, n_min):
    report = ttadapt.inspect(model, *inputs)
    assert report.unaveraged == [], str(report)
    assert len(report.averaged) >= n_min, str(report)
    other = {n: p.detach() + 0.05 * torch.randn_like(p) for n, p in model.named_parameters()}
    got = ttadapt.averaged_grad(model, closure, other)
    params = [p for p in model.parameters() if p.requires_grad]
    plain = torch.autograd.grad(closure(), params, allow_unused=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    flat_got = torch.cat([got[n].flatten() for n, g in zip(names, plain) if g is not None])
    flat_plain = torch.cat([g.flatten() for g in plain if g is not None])
    assert torch.isfinite(flat_got).all()
    assert rel_err(flat_got, flat_plain) > 1e-3
    return report


def test_resnet18_reused_inplace_relu():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None, num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([1, 4])
    report = _check(model, (x,), lambda: F.cross_entropy(model(x), y), n_min=17)
    assert len(report.averaged) == 17  # stem + 2 per BasicBlock × 8 (self.relu is reused)
    assert ("layer1.0.relu", "relu_", 2, True) in report.rows()


def test_functional_model():
    model = FunctionalNet()
    x = torch.randn(4, 6)
    report = _check(model, (x,), lambda: model(x).square().mean(), n_min=7)
    assert [c.call for c in report.averaged] == ["gelu", "tanh", "sigmoid", "silu", "leaky_relu", "sigmoid", "relu"]


def test_inplace_result_ignored_keeps_semantics():
    model = FunctionalNet()
    x = torch.randn(4, 6)
    with torch.no_grad():
        want = model(x)
    other = {n: p.detach() for n, p in model.named_parameters()}
    ttadapt.averaged_grad(model, lambda: model(x).sum(), other)
    from ttadapt.averaged import averaged_loss

    out = []
    averaged_loss(model, lambda: (out.append(model(x)), out[-1].sum())[1], other)
    torch.testing.assert_close(out[-1].detach(), want)


def test_tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=3,
    )
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 50, (3, 10))
    labels = torch.tensor([0, 2, 1])
    report = _check(model, (ids,), lambda: model(input_ids=ids, labels=labels).loss, n_min=3)
    assert any("intermediate_act_fn" in c.module for c in report.averaged)


def _tiny_hf(name: str):
    """(model, closure) of a tiny random Hugging Face model (dropout off)."""
    transformers = pytest.importorskip("transformers")
    small = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    torch.manual_seed(0)
    if name == "gpt2":
        config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                         bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(config)
    elif name == "llama":
        config = transformers.LlamaConfig(**small, num_key_value_heads=1, max_position_embeddings=32)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.ViTConfig(image_size=16, patch_size=4, num_labels=3, **small)
        model = transformers.ViTForImageClassification(config)
    model.eval()
    if name == "vit":
        x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 2])
        return model, (x,), lambda: model(pixel_values=x, labels=y).loss
    ids = torch.randint(0, 50, (2, 8))
    return model, (ids,), lambda: model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("name, unaveraged", [
    ("gpt2", []),
    # a hand-written RMSNorm (pow, rsqrt) keeps its ordinary derivative, as a normalisation does;
    # the rotary embedding's cos / sin of positions take no parameter and are not listed
    ("llama", ["pow", "rsqrt"] * 5),
    ("vit", []),
])
def test_tiny_hugging_face_models(name, unaveraged):
    model, inputs, closure = _tiny_hf(name)
    report = ttadapt.inspect(model, *inputs)
    assert [c.call for c in report.unaveraged] == unaveraged, str(report)
    assert len(report.averaged) == 2, str(report)  # one activation per MLP block
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    plain = torch.autograd.grad(closure(), params, allow_unused=True)
    same = ttadapt.averaged_grad(model, closure, {})
    for n, g in zip(names, plain):
        if g is not None:
            torch.testing.assert_close(same[n], g, rtol=1e-5, atol=1e-7)
    # a move of the MLP weights only: the secants replace the activations' derivatives there
    other = {n: p.detach() + 0.5 * torch.randn_like(p) for n, p in model.named_parameters()
             if any(k in n for k in ("mlp", "intermediate"))}
    got = ttadapt.averaged_grad(model, closure, other)
    flat_got = torch.cat([got[n].flatten() for n, g in zip(names, plain) if g is not None])
    flat_plain = torch.cat([g.flatten() for g in plain if g is not None])
    assert torch.isfinite(flat_got).all()
    assert rel_err(flat_got, flat_plain) > 1e-3


class _Rotary(nn.Module):
    """A rotary-style embedding: cos / sin of positions times a buffer, then a Linear layer and
    a hand-written normalisation."""

    def __init__(self):
        super().__init__()
        self.register_buffer("inv_freq", torch.rand(3))
        self.l = nn.Linear(3, 3)

    def forward(self, x):
        angles = torch.arange(x.shape[0], dtype=x.dtype)[:, None] * self.inv_freq
        h = self.l(x * torch.cos(angles) + torch.sin(angles))
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_inspect_lists_pointwise_calls_of_parameters_only():
    report = ttadapt.inspect(_Rotary(), torch.randn(4, 3))
    assert [c.call for c in report.unaveraged] == ["pow", "rsqrt"]
    assert "ordinary derivative" in str(report)


class _LinearThen(nn.Module):
    """A Linear layer, then ``tail`` of its output."""

    def __init__(self, tail):
        super().__init__()
        self.l = nn.Linear(3, 3)
        self.tail = tail

    def forward(self, x):
        return self.tail(self.l(x))


@pytest.mark.parametrize("tail, unaveraged, averaged", [
    (lambda h: torch.exp(h) + torch.tanh(h) + F.threshold(h, 0.1, 0.0), ["exp", "threshold"], ["tanh"]),
    # roundings, binary maps, torch.special (whose expit is the sigmoid)
    (lambda h: torch.round(h * 4) / 4 + torch.maximum(h, 0.1 * h) + torch.special.ndtr(h) + torch.special.expit(h),
     ["round", "maximum", "special.ndtr"], ["sigmoid"]),
    # hand-written piecewise functions: the comparison making the mask, the binary max; a mask of
    # constants and a max reduction are no nonlinearity of the parameters (not listed)
    (lambda h: torch.where(h > 0, h, 0.1 * h) + h * (h >= 0).float() + h.masked_fill(h.lt(0), 0.0)
     + torch.max(h, torch.zeros_like(h)) + (torch.ones(2, 3) > 0.5).float() + h.max(dim=1, keepdim=True).values
     + torch.relu(h),
     ["gt (mask)", "ge (mask)", "lt (mask)", "max"], ["relu"]),
    # an activation called as an aten op directly: the registry knows the Python forms only
    (lambda h: torch.ops.aten.relu.default(h) + torch.ops.aten.gelu(h), ["aten.relu", "aten.gelu"], []),
])
def test_inspect_reports_unaveraged_pointwise_calls(tail, unaveraged, averaged):
    report = ttadapt.inspect(_LinearThen(tail), torch.randn(2, 3))
    assert [c.call for c in report.unaveraged] == unaveraged
    assert [c.call for c in report.averaged] == averaged
    text = str(report)
    assert f"{len(unaveraged)} NOT averaged" in text and unaveraged[0] in text


def test_an_averaged_pass_warns_about_aten_activation_calls_once(fresh_ttadapt_warnings):
    model = _LinearThen(lambda h: torch.ops.aten.relu.default(h).sum())
    x = torch.randn(2, 3)
    with pytest.warns(RuntimeWarning, match=r"torch\.ops\.aten\.relu is called directly"):
        got = ttadapt.averaged_grad(model, lambda: model(x), {"l.weight": model.l.weight.detach() + 1.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ttadapt.averaged_grad(model, lambda: model(x), {})
    # its ordinary derivative, at the current parameters
    want = torch.autograd.grad(model(x), [model.l.weight])[0]
    assert torch.equal(got["l.weight"], want)


def test_inspect_leaves_model_and_rng_alone():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Dropout(0.5), nn.ReLU()).train()
    buffers = [b.clone() for b in model.buffers()]
    x = torch.randn(2, 1, 5, 5)
    rng = torch.get_rng_state()
    report = ttadapt.inspect(model, x, linear=True)
    assert [c.call for c in report.averaged] == ["conv2d", "relu"]
    assert torch.equal(torch.get_rng_state(), rng)
    for a, b in zip(model.buffers(), buffers):
        assert torch.equal(a, b)
