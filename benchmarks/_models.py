"""Models shared by the benchmark scripts."""

from __future__ import annotations

from torch import nn


def model_b() -> nn.Sequential:
    """The paper's Model B (spec §6): 2 × Conv+ELU+MaxPool, 28 × Linear(+Tanh); 8,228 parameters."""
    layers: list[nn.Module] = [
        nn.Conv2d(1, 8, 3), nn.ELU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3), nn.ELU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(400, 10), nn.Tanh(),
    ]
    for _ in range(26):
        layers += [nn.Linear(10, 10), nn.Tanh()]
    layers.append(nn.Linear(10, 10))
    return nn.Sequential(*layers)


def wide_tanh_mlp(width: int = 512, depth: int = 28) -> nn.Sequential:
    """Model B's deep tanh stack made wide enough that arithmetic, not dispatch, dominates."""
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(784, width), nn.Tanh()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def small_relu_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10),
    )
