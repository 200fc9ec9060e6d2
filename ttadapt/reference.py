"""The exact average gradient by quadrature (spec §1, paper Eq. 4) — the oracle for the engine.

``AVG[θa,θb] ∇ℓ = ∫₀¹ ∇ℓ(θa + t·(θb − θa)) dt``, evaluated with Gauss–Legendre quadrature of the
ordinary (autograd) gradient: ``points`` forward/backward passes. Exact for loss surfaces whose
gradient is a polynomial of degree < 2·points along the segment; for smooth models it converges
exponentially in ``points``; at kinks of piecewise-linear activations it converges slowly, and a
reference should split the segment there (see the tests).
"""

from __future__ import annotations

import functools
from typing import Mapping

import torch
from torch import Tensor, nn

from .averaged import Closure, call_closure, require_autograd
from .states import ModelLayout, evaluated_at, fork_rng, resolve_state

__all__ = ["path_average_grad", "gauss_legendre"]


@functools.lru_cache(maxsize=64)
def gauss_legendre(points: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Nodes and weights of the ``points``-point Gauss–Legendre rule on [0, 1] (Golub–Welsch)."""
    if not isinstance(points, int) or points < 1:
        raise ValueError(f"points must be a positive integer, got {points!r}")
    k = torch.arange(1, points, dtype=torch.float64)
    off = k / torch.sqrt(4 * k * k - 1)
    jacobi = torch.diag(off, 1) + torch.diag(off, -1)
    nodes, vectors = torch.linalg.eigh(jacobi)
    weights = 2 * vectors[0] ** 2
    return tuple(((nodes + 1) / 2).tolist()), tuple((weights / 2).tolist())


def path_average_grad(
    model: nn.Module,
    closure: Closure,
    start: Mapping[str, Tensor] | None,
    end: Mapping[str, Tensor] | None,
    *,
    points: int = 16,
) -> dict[str, Tensor]:
    """The average of the ordinary gradient along the straight segment from ``start`` to ``end``.

    ``start``/``end`` map parameter names to tensors (names left out: the current value). Each of
    the ``points`` evaluations sees the same random state (same dropout masks) and private copies
    of the buffers, so the model — parameters, ``.grad``, BatchNorm statistics — is left exactly as
    it was; the RNG ends as after one ordinary forward.

    Returns ``{name: average gradient}`` for every parameter that requires a gradient.
    """
    require_autograd("path_average_grad")
    nodes, weights = gauss_legendre(points)
    layout = ModelLayout(model)
    a = resolve_state(layout, start, "start")
    b = resolve_state(layout, end, "end")
    names = list(layout.trainable())
    rng = fork_rng(layout)
    total = {name: torch.zeros_like(a[name]) for name in names}
    for t, w in zip(nodes, weights):
        state = {name: torch.lerp(a[name], b[name], t) if a[name].is_floating_point() else a[name] for name in a}
        leaves = [state[name].requires_grad_(True) for name in names]
        rng.rewind()
        with torch.enable_grad(), evaluated_at(layout, state):
            loss = call_closure(closure)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad else [None] * len(leaves)
        for name, g in zip(names, grads):
            if g is not None:
                total[name].add_(g, alpha=w)
    return total
