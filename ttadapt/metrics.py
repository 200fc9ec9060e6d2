"""The paper's metrics (spec §4): relative sample efficiency, relative batch-loss minimization
improvement at matched L1 step length (with relative step lengths), accuracy, mean ± SEM."""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = ["MeanSEM", "mean_sem", "accuracy", "sample_efficiency", "batch_loss_improvement", "step_lengths",
           "relative_step_lengths", "scale_to_l1"]


class MeanSEM(NamedTuple):
    mean: float
    sem: float  # standard error of the mean (sample standard deviation / sqrt(n)); 0 for n = 1

    def __str__(self) -> str:
        return f"{self.mean:.4g} ± {self.sem:.2g}"


def mean_sem(values: Sequence[float] | Tensor) -> MeanSEM:
    """Mean and standard error of the mean."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.numel() == 0:
        raise ValueError("mean_sem needs at least one value")
    sem = float(v.std(unbiased=True) / math.sqrt(v.numel())) if v.numel() > 1 else 0.0
    return MeanSEM(float(v.mean()), sem)


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in [0, 1]."""
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} predictions for {labels.shape[0]} labels")
    return float((logits.argmax(-1) == labels).double().mean())


def _curves(losses: Sequence[Sequence[float]] | Tensor, name: str) -> Tensor:
    t = torch.as_tensor(losses, dtype=torch.float64)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[1] == 0:
        raise ValueError(f"{name} must have shape (runs, epochs), got {tuple(t.shape)}")
    return t


def _ratio(curve_a: Tensor, curve_b: Tensor, horizon: int) -> float:
    """B's epoch of best loss within 1..horizon, over A's first epoch (within the same window)
    with a loss at most that; 0 when A never gets there."""
    window_b = curve_b[:horizon]
    best = float(window_b.min())
    epoch_b = int(torch.nonzero(window_b == best)[0]) + 1
    reached = torch.nonzero(curve_a[:horizon] <= best)
    if reached.numel() == 0:
        return 0.0
    return epoch_b / (int(reached[0]) + 1)


def sample_efficiency(losses_a: Sequence[Sequence[float]] | Tensor, losses_b: Sequence[Sequence[float]] | Tensor) -> float:
    """Relative sample efficiency of algorithm A against baseline B (1.0 = as efficient; the
    paper's "444 %" is 4.44).

    ``losses_a``, ``losses_b``: per-epoch losses, shape ``(runs, epochs)`` (the run counts may
    differ). For every horizon E′ = 1..E: the epoch at which B reaches its best loss within epochs
    1..E′, divided by the first epoch (within 1..E′) at which A reaches that loss (0 if it never
    does) — once on the mean and once on the median loss curves over runs; the geometric mean of
    the two ratios; then the average over all horizons. "Reaching" means a loss ≤ the target;
    the first epoch attaining B's best is B's epoch.
    """
    a, b = _curves(losses_a, "losses_a"), _curves(losses_b, "losses_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"both need the same number of epochs, got {a.shape[1]} and {b.shape[1]}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("losses must be finite")
    mean_a, mean_b = a.mean(0), b.mean(0)
    med_a, med_b = a.median(0).values, b.median(0).values
    if a.shape[0] % 2 == 0:  # torch's median is the lower middle; the median of an even count is the midpoint
        med_a = a.quantile(0.5, dim=0)
    if b.shape[0] % 2 == 0:
        med_b = b.quantile(0.5, dim=0)
    total = 0.0
    epochs = a.shape[1]
    for horizon in range(1, epochs + 1):
        r_mean = _ratio(mean_a, mean_b, horizon)
        r_median = _ratio(med_a, med_b, horizon)
        total += math.sqrt(r_mean * r_median)
    return total / epochs


def batch_loss_improvement(decrease_ag: Sequence | Tensor, decrease_plain: Sequence | Tensor) -> MeanSEM:
    """Relative batch-loss minimization improvement of the AG update over the ordinary one.

    ``decrease_ag``, ``decrease_plain``: per-step loss decreases ``ℓ(θ) − ℓ(θ + Δ)`` on the same
    batch at the same parameters, both updates with the same L1 length, shape ``(runs, steps)``
    (or ``(steps,)`` for one run). Per run the decreases are summed over steps and the improvement
    is ``(Σ AG − Σ ordinary) / |Σ ordinary|``; the result is the mean ± SEM over runs (0.113 = the
    paper's 11.3 %).
    """
    ag, plain = _curves(decrease_ag, "decrease_ag"), _curves(decrease_plain, "decrease_plain")
    if ag.shape != plain.shape:
        raise ValueError(f"both need the same shape, got {tuple(ag.shape)} and {tuple(plain.shape)}")
    s_ag, s_plain = ag.sum(1), plain.sum(1)
    if bool((s_plain == 0).any()):
        raise ValueError("the ordinary update's total decrease is 0 in some run: the relative improvement is undefined")
    return mean_sem((s_ag - s_plain) / s_plain.abs())


def step_lengths(delta: Mapping[str, Tensor] | Sequence[Tensor]) -> tuple[float, float]:
    """(L1, L2) length of a parameter update given per tensor."""
    values = list(delta.values()) if isinstance(delta, Mapping) else list(delta)
    l1 = sum(float(t.detach().double().abs().sum()) for t in values)
    l2 = math.sqrt(sum(float(t.detach().double().square().sum()) for t in values))
    return l1, l2


def relative_step_lengths(delta_ag: Mapping[str, Tensor] | Sequence[Tensor], delta_plain: Mapping[str, Tensor] | Sequence[Tensor]) -> tuple[float, float]:
    """(L1, L2) length of the AG update relative to the ordinary one."""
    a1, a2 = step_lengths(delta_ag)
    p1, p2 = step_lengths(delta_plain)
    if p1 == 0 or p2 == 0:
        raise ValueError("the ordinary update has zero length")
    return a1 / p1, a2 / p2


def scale_to_l1(delta: Mapping[str, Tensor], length: float) -> dict[str, Tensor]:
    """``delta`` scaled to L1 length ``length`` (zero stays zero)."""
    l1, _ = step_lengths(delta)
    factor = length / l1 if l1 > 0 else 0.0
    return {k: v * factor for k, v in delta.items()}
