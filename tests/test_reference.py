"""The exact quadrature reference against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import ttadapt
from ttadapt.reference import gauss_legendre


@pytest.mark.parametrize("points", [1, 2, 5, 16])
def test_gauss_legendre_is_exact_for_polynomials(points):
    nodes, weights = gauss_legendre(points)
    assert math.isclose(sum(weights), 1.0, rel_tol=1e-14)
    for degree in range(2 * points):
        integral = sum(w * t**degree for t, w in zip(nodes, weights))
        assert math.isclose(integral, 1 / (degree + 1), rel_tol=1e-12), degree
    t = nodes[0]
    assert 0 < t < 1


def test_gauss_legendre_rejects_bad_points():
    with pytest.raises(ValueError):
        gauss_legendre(0)


def test_quadratic_loss_average_is_gradient_at_midpoint():
    # ℓ(θ) = ½‖Aθ − b‖²: ∇ℓ is affine in θ, so its average over the segment is ∇ℓ at the midpoint.
    model = nn.Linear(4, 3, bias=False).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randn(6, 3, dtype=torch.float64)

    def closure():
        return 0.5 * (model(x) - y).square().sum()

    a = {"weight": torch.randn(3, 4, dtype=torch.float64)}
    b = {"weight": torch.randn(3, 4, dtype=torch.float64)}
    mid = (a["weight"] + b["weight"]) / 2
    want = (mid @ x.T - y.T) @ x
    got = ttadapt.path_average_grad(model, closure, a, b, points=2)
    torch.testing.assert_close(got["weight"], want, rtol=1e-12, atol=1e-12)


def test_closed_form_of_a_smooth_activation():
    # ℓ(w) = tanh(w·x) summed; the average of the gradient (1 − tanh²(w·x))·x over w ∈ [wa, wb]
    # is x·(tanh(wb·x) − tanh(wa·x)) / ((wb − wa)·x) per coordinate — a closed form.
    x = torch.tensor([0.7, -1.3], dtype=torch.float64)

    class Scalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(2, dtype=torch.float64))

        def forward(self, x):
            return torch.tanh(self.w * x)

    m = Scalar()
    wa, wb = torch.tensor([0.2, -0.5], dtype=torch.float64), torch.tensor([1.9, 0.8], dtype=torch.float64)
    want = (torch.tanh(wb * x) - torch.tanh(wa * x)) / (wb - wa)
    got = ttadapt.path_average_grad(m, lambda: m(x).sum(), {"w": wa}, {"w": wb}, points=40)
    torch.testing.assert_close(got["w"], want, rtol=1e-12, atol=1e-14)
    # The pre-activation w·x moves linearly: the engine's secant is the same closed form.
    with torch.no_grad():
        m.w.copy_(wb)
    averaged = ttadapt.averaged_grad(m, lambda: m(x).sum(), {"w": wa})
    torch.testing.assert_close(averaged["w"], want, rtol=1e-12, atol=1e-14)


def test_reference_leaves_the_model_alone():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Dropout(0.5)).train()
    x = torch.randn(5, 3)
    buffers = [b.clone() for b in model.buffers()]
    params = [p.detach().clone() for p in model.parameters()]
    ttadapt.path_average_grad(model, lambda: model(x).sum(), None, {"0.weight": torch.zeros(3, 3)}, points=3)
    for a, b in zip(model.buffers(), buffers):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), params):
        assert torch.equal(a, b) and a.grad is None
