"""ttadapt's faster max pooling (ttadapt.pooling: the fused kernels for float32 and strided maxima
for other dtypes in the no-graph passes, the kernels with PyTorch's backward in the graph passes)
against PyTorch's own call, and the engine's results with it against those without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ttadapt
import ttadapt.pooling as pooling
import ttadapt.sites as sites
from ttadapt import kernels

CONFIGS = [
    # input shape, kernel, stride, padding, dilation
    ((4, 3, 26, 26), 2, None, 0, 1),
    ((4, 3, 27, 25), 2, 2, 0, 1),  # odd sizes: the last row and column are dropped
    ((2, 5, 32, 32), 3, 2, 1, 1),  # resnet's stem pool
    ((2, 5, 17, 19), 3, 1, 1, 1),
    ((2, 5, 17, 19), (3, 2), (2, 1), (1, 0), 1),
    ((2, 5, 20, 21), 3, 2, 1, 2),  # dilated
    ((2, 5, 9, 9), 1, 1, 0, 1),  # a copy
    ((3, 12, 12), 2, 2, 0, 1),  # no batch dimension
    ((2, 4, 13, 13), (2,), (3,), 1, (1,)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape,k,s,p,d", CONFIGS)
def test_same_values_as_pytorch(shape, k, s, p, d, dtype) -> None:
    x = (2 * torch.randn(*shape)).round().to(dtype)  # many ties, −0.0 and +0.0 among them
    x.view(-1)[::7] = float("-inf")
    ref = F.max_pool2d(x, k, s, p, d)
    with torch.no_grad():
        out = pooling.max_pool2d_by_maxima(x, k, s, p, d)
    assert out is not None and out.is_contiguous() and out.data_ptr() != x.data_ptr()
    assert out.shape == ref.shape and out.dtype == ref.dtype and torch.equal(out, ref)


def test_nan_propagates_as_in_pytorch() -> None:
    x = torch.randn(2, 3, 10, 10)
    x[0, 0, 3, 4] = float("nan")
    x[1, 2, 0, 0] = float("nan")
    x[1, 1] = float("-inf")
    for k, s, p in [(2, 2, 0), (3, 2, 1), (3, 1, 1)]:
        ref = F.max_pool2d(x, k, s, p)
        out = pooling.max_pool2d_by_maxima(x, k, s, p)
        assert ref.isnan().any()
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("case", ["ceil_mode", "indices", "channels_last", "int", "graph", "off", "padding", "empty", "5d",
                                  "subclass"])
def test_pytorch_call_where_it_does_not_apply(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(2, 3, 8, 8)
    kwargs: dict = {}
    if case == "ceil_mode":
        kwargs["ceil_mode"] = True
    elif case == "indices":
        kwargs["return_indices"] = True
    elif case == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif case == "int":
        x = x.to(torch.int32)
    elif case == "graph":  # a graph: the 2 × 2 float32 kernel only (strided maxima give no indices)
        x = x.double().requires_grad_()
    elif case == "off":
        monkeypatch.setattr(pooling, "ENABLED", False)
    elif case == "padding":
        kwargs["padding"] = 2  # more than half the kernel: PyTorch's call raises its own error
    elif case == "empty":
        x = x[:0]
    elif case == "5d":
        x = x[None]
    elif case == "subclass":
        x = nn.Parameter(x, requires_grad=False)
    assert pooling.max_pool2d_by_maxima(x, 2, **kwargs) is None
    assert pooling.max_pool2d_call((x, 2), {"unknown": 1}) is None


class Pooled(nn.Module):
    """Conv + ELU + pooling in all three call forms + tanh head, with a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.c2 = nn.Conv2d(4, 6, 3)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 2 * 2, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.elu(self.bn(self.c1(x))))  # 20 → 18 → 9
        x = torch.max_pool2d(torch.tanh(self.c2(x)), 3, 2, 1)  # 9 → 7 → 4
        return self.head(F.max_pool2d(x, kernel_size=2))  # 4 → 2


@pytest.mark.parametrize("what", ["averaged_grad", "AG1", "AG2", "AG3"])
def test_engine_identical_with_and_without(what: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The faster pooling gives bit-identical gradients, parameters and buffers: every call takes
    it, in the graph passes with PyTorch's backward (where the kernels are compiled)."""
    calls: list[tuple[bool, int, bool]] = []  # (graph, kernel size, taken)
    real = sites.max_pool2d_call

    def spy(args, kwargs):
        out = real(args, kwargs)
        k = args[1] if len(args) > 1 else kwargs["kernel_size"]
        calls.append((torch.is_grad_enabled() and args[0].requires_grad, k, out is not None))
        return out

    monkeypatch.setattr(sites, "max_pool2d_call", spy)
    x, y = torch.randn(16, 1, 20, 20), torch.randint(0, 3, (16,))

    def run(enabled: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(pooling, "ENABLED", enabled)
        torch.manual_seed(1)
        model = Pooled().train()
        closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
        if what == "averaged_grad":
            other = {n: p.detach() + 0.05 * torch.randn_like(p) for n, p in model.named_parameters()}
            return list(ttadapt.averaged_grad(model, closure, other).values()) + list(model.state_dict().values())
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        wrapper = ttadapt.AG3(model, opt, d=1) if what == "AG3" else getattr(ttadapt, what)(model, opt)
        for _ in range(3):
            wrapper.step(closure)
        return list(model.state_dict().values())

    fast = run(True)
    passes = {"averaged_grad": 2, "AG3": 4}.get(what, 6)  # two per step (AG-3's step 0 is a plain step, unseen)
    assert len(calls) == 3 * passes
    graph = [(k, taken) for g, k, taken in calls if g]
    assert len(graph) == 3 * passes // 2
    assert all(taken == kernels.available() for k, taken in graph) and {k for k, _ in graph} == {2, 3}
    assert all(taken for g, _, taken in calls if not g)
    calls.clear()
    plain = run(False)
    assert calls and not any(taken for _, _, taken in calls)
    assert all(torch.equal(a, b) for a, b in zip(fast, plain, strict=True))


@pytest.mark.skipif(not kernels.available(), reason="no fused kernels here")
@pytest.mark.parametrize("shape,window", [((128, 8, 26, 26), (2,)), ((3, 2, 7, 9), (2,)), ((5, 11, 10), (2,)),
                                          ((16, 4, 32, 32), (3, 2, 1)), ((3, 2, 7, 9), (3, 1, 1)), ((2, 3, 11, 12), ((3, 2), 2, (1, 0), 2))])
def test_graph_pooling_is_pytorchs_bit_for_bit(shape, window) -> None:
    """With a graph the kernel's output, its indices and the gradient through PyTorch's backward
    (second order included) are the ordinary call's, with ties, −∞ and NaN windows."""
    base = (2 * torch.randn(*shape)).round()  # ties, −0.0 beside +0.0
    base.view(-1)[::17] = float("nan")
    base.view(-1)[::5] = float("-inf")
    x1, x2 = base.clone().requires_grad_(), base.clone().requires_grad_()
    with torch.enable_grad():
        got = pooling.max_pool2d_by_maxima(x1 * 1, *window)
        want = F.max_pool2d(x2 * 1, *window)
    assert got is not None and type(got.grad_fn).__name__ == "MaxPool2dBackward"
    assert torch.equal(got.detach().nan_to_num(0.0).view(torch.int32), want.detach().nan_to_num(0.0).view(torch.int32))
    g = torch.randn_like(want).requires_grad_()
    (g1,) = torch.autograd.grad(got, x1, g, create_graph=True)
    (g2,) = torch.autograd.grad(want, x2, g, create_graph=True)
    assert torch.equal(g1, g2) and g1.abs().sum() > 0
    w = torch.randn_like(g1)
    assert torch.equal(torch.autograd.grad((g1 * w).sum(), g)[0], torch.autograd.grad((g2 * w).sum(), g)[0])
    assert torch.equal(pooling.max_pool2d_by_maxima(x1 * 1, *window).detach().isnan(), want.detach().isnan())  # (in place after it: allowed)
    got.relu_()


@pytest.mark.skipif(not kernels.available(), reason="no fused kernels here")
@pytest.mark.parametrize("shape", [(128, 8, 26, 26), (3, 2, 7, 9), (5, 11, 10)])
def test_2x2_kernel_is_atens_bit_for_bit(shape) -> None:
    """The fused 2 × 2 kernel visits each window in ATen's order with its NaN rule: the same bits,
    a tie of −0.0 and +0.0 and NaN included."""
    x = (2 * torch.randn(*shape)).round()  # ties, −0.0 beside +0.0
    x.view(-1)[::17] = float("nan")
    x.view(-1)[::5] = float("-inf")
    got, want = kernels.max_pool2x2(x), F.max_pool2d(x, 2)
    assert got is not None and got.shape == want.shape and got.is_contiguous()
    assert torch.equal(got.isnan(), want.isnan()) and want.isnan().any()
    assert torch.equal(got.nan_to_num(0.0).view(torch.int32), want.nan_to_num(0.0).view(torch.int32))
    assert kernels.max_pool2x2(x.transpose(-1, -2)) is None  # not contiguous: not the kernel's
    assert kernels.max_pool2x2(x.double()) is None


def _window_pairs(k, s, p, d) -> tuple:
    pair = lambda v: (v, v) if isinstance(v, int) else (tuple(v) * 2)[:2]  # noqa: E731
    return pair(k), pair(k if s is None else s), pair(p), pair(d)


@pytest.mark.skipif(not kernels.available(), reason="no fused kernels here")
@pytest.mark.parametrize("shape,k,s,p,d", CONFIGS + [((1, 2, 3, 50), 3, 2, 1, 1), ((2, 3, 50, 3), (3, 1), 1, (1, 0), 1),
                                                     ((2, 2, 16, 16), 5, 3, 2, 1), ((1, 1, 12, 12), 3, 2, 0, 3)])
def test_kernel_is_atens_bit_for_bit_any_window(shape, k, s, p, d) -> None:
    """kernels.max_pool2d picks ATen's element in every window (values bit for bit, indices
    equal): ties of −0.0 and +0.0, −∞ and NaN, the plane-as-one-signal rows and row by row."""
    x = (2 * torch.randn(*shape)).round()
    x.view(-1)[::13] = float("nan")
    x.view(-1)[::7] = float("-inf")
    window = _window_pairs(k, s, p, d)
    want, want_at = F.max_pool2d(x, k, s, p, d, return_indices=True)
    for got in (kernels.max_pool2d(x, *window, indices=True), (kernels.max_pool2d(x, *window), None)):
        assert got is not None and got[0].shape == want.shape and got[0].is_contiguous()
        assert torch.equal(got[0].isnan(), want.isnan())
        assert torch.equal(got[0].nan_to_num(0.0).view(torch.int32), want.nan_to_num(0.0).view(torch.int32))
        assert got[1] is None or torch.equal(got[1], want_at)


@pytest.mark.skipif(not kernels.available(), reason="no fused kernels here")
def test_kernel_leaves_windows_that_miss_the_input_to_pytorch() -> None:
    """A dilated window can miss the input altogether (ATen: −∞ there, an index past it): the
    kernel declines, and the engine's pooling runs PyTorch's call."""
    x = torch.randn(1, 1, 1, 1)
    assert kernels.max_pool2d(x, (2, 2), (1, 1), (1, 1), (2, 2)) is None
    with torch.no_grad():  # without a graph the strided maxima take it: −∞, as ATen gives
        assert torch.equal(pooling.max_pool2d_by_maxima(x, 2, 1, 1, 2), F.max_pool2d(x, 2, 1, 1, 2))
    assert pooling.max_pool2d_by_maxima(x.requires_grad_(), 2, 1, 1, 2) is None


def test_pytorch_call_under_torch_func_transforms() -> None:
    """A vmapped tensor has no memory of its own for the kernel: PyTorch's call runs."""
    seen: list = []

    def f(xi: torch.Tensor) -> torch.Tensor:
        seen.append(pooling.max_pool2d_by_maxima(xi, 2))
        return F.max_pool2d(xi, 2)

    torch.vmap(f)(torch.randn(3, 2, 4, 8, 8))
    assert seen == [None]
