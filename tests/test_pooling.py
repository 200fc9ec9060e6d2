"""Max pooling by strided maxima in the no-graph passes (ttadapt.pooling) against PyTorch's own
call, and the engine's results with it against those without it."""

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
    elif case == "graph":
        x.requires_grad_()
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
    """The pass at the other state with the strided maxima gives bit-identical results; the
    graph pass never uses them."""
    calls: list[bool] = []
    real = sites.max_pool2d_call

    def spy(args, kwargs):
        out = real(args, kwargs)
        calls.append(out is not None and not torch.is_grad_enabled())
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
    assert calls and all(calls)  # every call it saw was in a no-graph pass, and it took each
    assert len(calls) == 3 * (1 if what == "averaged_grad" else 3 - (what == "AG3"))
    plain = run(False)
    assert all(torch.equal(a, b) for a, b in zip(fast, plain, strict=True))


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


def test_pytorch_call_under_torch_func_transforms() -> None:
    """A vmapped tensor has no memory of its own for the kernel: PyTorch's call runs."""
    seen: list = []

    def f(xi: torch.Tensor) -> torch.Tensor:
        seen.append(pooling.max_pool2d_by_maxima(xi, 2))
        return F.max_pool2d(xi, 2)

    torch.vmap(f)(torch.randn(3, 2, 4, 8, 8))
    assert seen == [None]
