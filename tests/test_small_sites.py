"""The shortest route of small sites in the pass at the graph state (sites._small_site: the
model's call and a fused kernel's slope, no general checks) against the general route, bit for
bit, and against the exact average gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ttadapt
import ttadapt.sites as sites
from ttadapt import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no fused kernels here")


class Functional(nn.Module):
    """Linear layers joined by a functional activation call."""

    def __init__(self, act, width: int = 12, depth: int = 4) -> None:
        super().__init__()
        self.act = act
        self.layers = nn.ModuleList(nn.Linear(width if i else 5, width) for i in range(depth))
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.act(layer(x))
        return self.head(x)


ACTS = {
    "nn.Tanh": lambda: nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)),
    "torch.tanh": lambda: Functional(torch.tanh),
    "Tensor.tanh": lambda: Functional(lambda x: x.tanh()),
    "nn.ReLU": lambda: nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)),
    "F.relu": lambda: Functional(F.relu),
    "F.relu6": lambda: Functional(lambda x: F.relu6(3 * x)),
    "nn.Sigmoid": lambda: nn.Sequential(nn.Linear(5, 12), nn.Sigmoid(), nn.Linear(12, 12), nn.Sigmoid(), nn.Linear(12, 3)),
    "torch.sigmoid": lambda: Functional(torch.sigmoid),
    "sigmoid, output kept": lambda: Functional(lambda x: torch.sigmoid(x) * 1.0),
    "sigmoid, output overwritten": lambda: Functional(lambda x: torch.sigmoid(x).mul_(1.0)),  # (σ(ub) formed anew)
}


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    taken: list[str] = []
    real = sites._small_site

    def spy(checked, act, *args):
        taken.append(act.name)
        return real(checked, act, *args)

    monkeypatch.setattr(sites, "_small_site", spy)
    return taken


@pytest.mark.parametrize("name, what", [
    (name, what) for name in ACTS for what in ("averaged_grad", "AG3", "AG3-ties")
    # (AG-3's first step is plain, whose backward needs the sigmoid's output unmodified)
    if not (name == "sigmoid, output overwritten" and what == "AG3")
])
def test_same_bits_as_the_general_route(name: str, what: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(16, 5)
    if name.endswith("relu") or name.endswith("ReLU") or name == "F.relu6":
        x = x.round()  # ReLU's kink met exactly (ties of 0 included)

    def run(fast: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(sites, "_small_dense", sites._small_dense if fast else (lambda *a: False))
        torch.manual_seed(3)
        model = ACTS[name]()
        closure = lambda: model(x).square().mean()  # noqa: E731
        if what == "averaged_grad":
            other = {n: p.detach() + 0.2 * torch.randn_like(p) for n, p in model.named_parameters()}
            return list(ttadapt.averaged_grad(model, closure, other).values())
        if what == "AG3-ties":  # only the head differs: every activation input ties with the anchor's
            other = {n: p.detach() + (0.2 if n.startswith(("head", "4")) else 0.0) for n, p in model.named_parameters()}
            return list(ttadapt.averaged_grad(model, closure, other).values())
        wrapper = ttadapt.AG3(model, torch.optim.Adam(model.parameters(), 1e-2), d=1)
        for _ in range(4):
            wrapper.step(closure)
        return list(model.state_dict().values())

    taken = _spy(monkeypatch)
    fast = run(True)
    assert len(taken) >= 2, "the small sites took the short route"
    taken.clear()
    general = run(False)
    assert not taken
    assert all(torch.equal(a, b) for a, b in zip(fast, general, strict=True))


def test_short_route_against_the_exact_average(monkeypatch: pytest.MonkeyPatch) -> None:
    """y = W2·tanh(W1·x + b1), loss linear in y, `other` differing in W1 and b1 only: float32
    through the short route equals Gauss–Legendre quadrature of float64 gradients."""
    taken = _spy(monkeypatch)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3))
    x = torch.randn(16, 5)
    other = {n: p.detach() + 0.3 * torch.randn_like(p) for n, p in model.named_parameters() if n.startswith("0.")}
    got = ttadapt.averaged_grad(model, lambda: model(x).sum(), other)
    assert taken == ["tanh"]
    model64 = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    model64.load_state_dict(model.state_dict())
    ref = ttadapt.path_average_grad(model64, lambda: model64(x.double()).sum(), None,
                                    {n: t.double() for n, t in other.items()}, points=64)
    for n in ("0.weight", "0.bias"):
        torch.testing.assert_close(got[n].double(), ref[n], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("case", ["inplace", "float64", "settings", "large", "no_grad_input"])
def test_general_route_where_the_short_one_does_not_apply(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    taken = _spy(monkeypatch)
    x = torch.randn(16, 5)
    if case == "inplace":
        model = nn.Sequential(nn.Linear(5, 12), nn.ReLU(inplace=True), nn.Linear(12, 3))
    elif case == "float64":
        model, x = ACTS["nn.Tanh"]().double(), x.double()
    elif case == "settings":
        model = nn.Sequential(nn.Linear(5, 12), nn.ELU(), nn.Linear(12, 12), nn.Hardtanh(-0.5, 0.5), nn.Linear(12, 3))
    elif case == "large":
        model, x = nn.Sequential(nn.Linear(5, 2048), nn.Tanh(), nn.Linear(2048, 3)), torch.randn(16, 5)  # 32768 elements
    else:
        model = nn.Sequential(nn.Tanh(), nn.Linear(5, 3))  # the site's input is the batch: no graph into it
    other = {n: p.detach() + 0.1 * torch.randn_like(p) for n, p in model.named_parameters()}
    grads = ttadapt.averaged_grad(model, lambda: model(x).square().mean(), other)
    assert taken == [] and all(torch.isfinite(g).all() for g in grads.values())
