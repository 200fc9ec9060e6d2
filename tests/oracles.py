"""Independent references for the engine tests: the exact average gradient by Gauss–Legendre
quadrature of plain autograd gradients, split where a piecewise activation's pre-activation
crosses a kink (so every piece is smooth and the quadrature converges)."""

from __future__ import annotations

from typing import Callable, Iterable

import torch

import ttadapt


def split_points(ua: torch.Tensor, ub: torch.Tensor, kinks: Iterable[float]) -> list[float]:
    """The t in (0, 1) where u(t) = ua + t·(ub − ua) crosses one of ``kinks``."""
    ts = []
    d = ub - ua
    for k in kinks:
        t = (k - ua) / d
        t = t[(d != 0) & (t > 0) & (t < 1)]
        ts.extend(t.flatten().tolist())
    return sorted(set(ts))


def exact_average_grad(model, closure: Callable, start: dict, end: dict, cuts: list[float], points: int) -> dict:
    """∫₀¹ ∇ℓ(θ(t)) dt by Gauss–Legendre on each piece between consecutive ``cuts``."""
    edges = [0.0, *cuts, 1.0]
    names = set(start) | set(end)
    current = dict(model.named_parameters())
    a = {n: start.get(n, current[n]).detach() for n in names}
    b = {n: end.get(n, current[n]).detach() for n in names}
    total = None
    for t0, t1 in zip(edges[:-1], edges[1:]):
        if t1 - t0 <= 0:
            continue
        s0 = {n: torch.lerp(a[n], b[n], t0) for n in names}
        s1 = {n: torch.lerp(a[n], b[n], t1) for n in names}
        g = ttadapt.path_average_grad(model, closure, s0, s1, points=points)
        if total is None:
            total = {n: v * (t1 - t0) for n, v in g.items()}
        else:
            for n, v in g.items():
                total[n] += v * (t1 - t0)
    return total


# Exponential-linear and leaky activations: (name, settings, α, scale s, input scale κ) with
# f(u) = s·(max(u, 0) + α·expm1(κ·min(u, 0))) (LeakyReLU: ν·min(u, 0) instead).
_SELU = (1.6732632423543772848170429916717, 1.0507009873554804934193349852946)
PIECEWISE_CASES = [
    ("elu", {}, 1.0, 1.0, 1.0),
    ("elu", {"alpha": 0.3}, 0.3, 1.0, 1.0),
    ("selu", {}, *_SELU, 1.0),
    ("celu", {"alpha": 0.5}, 0.5, 1.0, 2.0),
    ("celu", {"alpha": 2.0}, 2.0, 1.0, 0.5),
    ("leaky_relu", {"negative_slope": 0.01}, 0.0, 1.0, 1.0),
    ("leaky_relu", {"negative_slope": 0.2}, 0.0, 1.0, 1.0),
]


def hard_secant_inputs(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """5,000 float32 input pairs where the plain quotient cancels: steps of 0.5, 1e-3 and 1e-5,
    a fifth of the inputs near −12 (saturated); no exact ties."""
    torch.manual_seed(seed)
    ua = torch.cat([torch.randn(3000) * 3, -12 + torch.randn(1000), torch.randn(1000)])
    step = torch.cat([torch.randn(3000) * 0.5, torch.randn(1000) * 1e-3, torch.randn(1000) * 1e-5])
    ub = ua + step
    ub[ub == ua] += 1e-3
    return ua, ub


def exact_piecewise_secant(fn: Callable, name: str, settings: dict, alpha: float, scale: float, kappa: float,
                           ua: torch.Tensor, ub: torch.Tensor) -> torch.Tensor:
    """The secant in float64 by a formula of its own: both inputs negative,
    s·α·e^{κ·ua}·expm1(κ·Δu)/Δu (ν for LeakyReLU); both positive, s; opposite signs, the float64
    quotient (f(ua), f(ub) have opposite signs there: no cancellation)."""
    a, b = ua.double(), ub.double()
    d = b - a
    if name == "leaky_relu":
        negative = torch.full_like(a, settings["negative_slope"])
    else:
        negative = scale * alpha * torch.exp(kappa * a) * torch.expm1(kappa * d) / d
    quotient = (fn(b, **settings) - fn(a, **settings)) / d
    return torch.where((a <= 0) & (b <= 0), negative, torch.where((a > 0) & (b > 0), torch.full_like(a, scale), quotient))


def exact_sigmoid_secant(ua: torch.Tensor, ub: torch.Tensor) -> torch.Tensor:
    """(σ(ub) − σ(ua)) / (ub − ua) in float64 by a formula of its own:
    σ(b) − σ(a) = e^{−a}·(−expm1(−d)) / ((1 + e^{−a})(1 + e^{−b})), d = b − a."""
    a, b = ua.double(), ub.double()
    d = b - a
    return torch.exp(-a) * -torch.expm1(-d) / ((1 + torch.exp(-a)) * (1 + torch.exp(-b))) / d
