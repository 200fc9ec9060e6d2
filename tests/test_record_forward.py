"""The pass at `other` computes the ELU family's and tanh's outputs with vectorised CPU kernels
(``Activation.record_forward``): it is taken where it applies, it changes the averaged
gradient only at float32 rounding (checked against the same computation in float64 and against
ATen's forward in that pass), and the model's own output at the current state is ATen's, bit
for bit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ttadapt
from ttadapt import kernels, sites

needs_kernels = pytest.mark.skipif(kernels._compiler() is None, reason="no C compiler: the fused kernels cannot be built")


class Functional(nn.Module):
    def __init__(self, call) -> None:
        super().__init__()
        self.call = call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.call(x)


ACTIVATIONS = {
    "ELU module": lambda: nn.ELU(),
    "ELU alpha 0.7": lambda: Functional(lambda x: F.elu(x, 0.7)),
    "SELU": lambda: Functional(torch.selu),
    "CELU": lambda: nn.CELU(1.3),
    "Tanh module": lambda: nn.Tanh(),
    "torch.tanh": lambda: Functional(torch.tanh),
}
KERNEL = {"Tanh module": "tanh", "torch.tanh": "tanh"}  # the kernel of each (else exp_linear)


def _model(act) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3), act(), nn.Conv2d(6, 4, 3), act(), nn.Flatten(), nn.Linear(4 * 16 * 16, 3))


def _spy(monkeypatch: pytest.MonkeyPatch, kernel: str = "exp_linear") -> list[int]:
    assert kernels.available()  # (loaded first: the self-test calls the kernels too)
    calls: list[int] = []
    real = getattr(kernels, kernel)

    def spy(u, *args):
        out = real(u, *args)
        calls.append(u.numel() if out is not None else -1)
        return out

    monkeypatch.setattr(kernels, kernel, spy)
    return calls


@needs_kernels
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_kernel_in_the_pass_at_other_changes_only_rounding(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(ACTIVATIONS[name])
    x, y = torch.randn(8, 1, 20, 20), torch.randint(0, 3, (8,))
    torch.manual_seed(1)
    other = {n: p.detach() + 0.05 * torch.randn_like(p) for n, p in model.named_parameters()}
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    calls = _spy(monkeypatch, KERNEL.get(name, "exp_linear"))

    loss = ttadapt.averaged_backward(model, closure, other)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert calls == [8 * 6 * 18 * 18, 8 * 4 * 16 * 16], "both sites of the pass at `other`, and only there"
    with torch.no_grad():
        assert torch.equal(loss, closure()), "the loss at the current state is the model's own"

    monkeypatch.setattr(sites, "RECORD_FORWARD_MIN", math.inf)  # ATen's forward in that pass
    aten = ttadapt.averaged_grad(model, closure, other)
    assert len(calls) == 2

    model64 = model.double()
    x64 = x.double()
    want = ttadapt.averaged_grad(model64, lambda: F.cross_entropy(model64(x64), y), {n: t.double() for n, t in other.items()})
    for n in want:
        scale = float(want[n].abs().max())
        err_kernel = float((got[n].double() - want[n]).abs().max()) / scale
        err_aten = float((aten[n].double() - want[n]).abs().max()) / scale
        assert err_kernel < 2e-5, (n, err_kernel)
        assert err_kernel < 4 * err_aten + 1e-6, (n, err_kernel, err_aten)  # no worse than ATen's forward there
        torch.testing.assert_close(got[n], aten[n], rtol=2e-5, atol=2e-5 * scale)


@needs_kernels
def test_in_place_calls_small_sites_and_graphs_keep_atens_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy(monkeypatch)
    x, y = torch.randn(8, 1, 20, 20), torch.randint(0, 3, (8,))
    model = _model(lambda: nn.ELU(inplace=True))
    other = {n: p.detach() + 0.05 * torch.randn_like(p) for n, p in model.named_parameters()}
    ttadapt.averaged_grad(model, lambda: F.cross_entropy(model(x), y), other)
    assert calls == [], "an in-place call must modify the model's tensor itself"

    small = nn.Sequential(nn.Linear(5, 7), nn.ELU(), nn.Linear(7, 2))  # 16 × 7 elements: below RECORD_FORWARD_MIN
    xs = torch.randn(16, 5)
    ttadapt.averaged_grad(small, lambda: small(xs).square().mean(), {n: p.detach() + 0.1 for n, p in small.named_parameters()})
    assert calls == []

    # seed="other" differentiates the loss at `other` through the model's output, not through
    # the sites, so the kernel applies there too; the result matches ATen's forward to rounding
    model = _model(ACTIVATIONS["ELU module"])
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    got = ttadapt.averaged_grad(model, closure, other, seed="other")
    assert len(calls) == 2
    monkeypatch.setattr(sites, "RECORD_FORWARD_MIN", math.inf)
    want = ttadapt.averaged_grad(model, closure, other, seed="other")
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=2e-5, atol=2e-5 * float(want[n].abs().max()))


@needs_kernels
def test_under_torch_func_transforms_atens_forward_runs() -> None:
    """A vmapped tensor has no memory of its own for the kernels: they decline."""
    seen: list = []

    def f(u: torch.Tensor) -> torch.Tensor:
        seen.extend([kernels.exp_linear(u, 1.0, 1.0, 1.0), kernels.tanh(u)])
        return F.elu(u)

    torch.vmap(f)(torch.randn(3, 8, 1000))
    assert seen == [None, None]
