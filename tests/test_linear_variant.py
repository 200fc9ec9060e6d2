"""Linear variant (Eq. 11): on an affine-only network of two layers with a loss linear in the
output, the averaged backward through the mean weight and the mean input is the exact average
gradient — every parameter may move. Quadrature with 4 points is exact there (the integrand is a
polynomial of degree 1 in t)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ttadapt

from conftest import rel_err


class Functional(nn.Module):
    """Two affine layers called through the functional API."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.b1 = nn.Parameter(torch.randn(4))
        self.w2 = nn.Parameter(torch.randn(5, 4 * 6 * 6))

    def forward(self, x):
        h = F.conv2d(x, self.w1, self.b1, stride=1, padding=1)
        return F.linear(h.flatten(1), self.w2)


CASES = {
    "linear": (lambda: nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3)), (4, 6)),
    "linear-3d-input": (lambda: nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3)), (2, 4, 6)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(2, 4, 3, stride=2), nn.Conv1d(4, 3, 2, dilation=2)), (3, 2, 11)),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.Conv2d(6, 2, 2, stride=2)), (2, 4, 6, 6)),
    "conv2d-same-padding": (lambda: nn.Sequential(nn.Conv2d(2, 3, 4, padding="same"), nn.Conv2d(3, 2, 3, padding="valid")), (2, 2, 7, 7)),
    "conv2d-unbatched": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.Conv2d(3, 2, 3)), (2, 7, 7)),
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(2, 3, 2), nn.Conv3d(3, 2, 2, padding=1)), (2, 2, 4, 4, 4)),
    "conv-then-linear": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)), (3, 2, 6, 6)),
    "functional": (Functional, (2, 3, 6, 6)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_linear_variant_is_exact_on_affine_networks(case):
    build, shape = CASES[case]
    net = build().double()
    x = torch.randn(*shape, dtype=torch.float64)
    c = torch.randn_like(net(x))

    def closure():
        return (c * net(x)).sum()

    other = {n: p.detach() + 0.5 * torch.randn_like(p) for n, p in net.named_parameters()}
    ref = ttadapt.path_average_grad(net, closure, None, other, points=4)
    got = ttadapt.averaged_grad(net, closure, other, linear=True)
    for name in ref:
        assert rel_err(got[name], ref[name]) < 1e-10, name
    plain = ttadapt.averaged_grad(net, closure, other, linear=False)
    assert max(rel_err(plain[n], ref[n]) for n in ref) > 1e-3  # the ordinary backward is not it


def test_linear_variant_with_activations_between():
    # One hidden activation, both layers moving: no longer exact, but close to the quadrature and
    # closer than the default variant for this small step.
    net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x = torch.randn(32, 5, dtype=torch.float64)
    c = torch.randn(32, 3, dtype=torch.float64)

    def closure():
        return (c * net(x)).sum()

    other = {n: p.detach() + 0.05 * torch.randn_like(p) for n, p in net.named_parameters()}
    ref = ttadapt.path_average_grad(net, closure, None, other, points=32)
    lin = ttadapt.averaged_grad(net, closure, other, linear=True)
    dflt = ttadapt.averaged_grad(net, closure, other)
    flat = lambda g: torch.cat([g[n].flatten() for n in ref])  # noqa: E731
    assert rel_err(flat(lin), flat(ref)) < rel_err(flat(dflt), flat(ref))
    assert rel_err(flat(lin), flat(ref)) < 1e-2
