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
