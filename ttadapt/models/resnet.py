"""torchvision's ResNet-152 with its ReLUs optionally swapped for another activation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

if TYPE_CHECKING:  # torchvision is imported when a ResNet is built: it takes seconds to import
    import torchvision

__all__ = ["resnet152", "swap_activation", "IMAGENET_FILES"]

# torchvision's ImageNet-1k checkpoints, looked up in the torch hub cache (<hub>/checkpoints/)
IMAGENET_FILES = {
    "imagenet": ("IMAGENET1K_V2", "IMAGENET1K_V1"),
    "imagenet_v2": ("IMAGENET1K_V2",),
    "imagenet_v1": ("IMAGENET1K_V1",),
}


def swap_activation(model: nn.Module, make: Callable[[], nn.Module]) -> int:
    """Replace every ``nn.ReLU`` module of ``model`` by ``make()``; returns how many."""
    count = 0
    for name, child in list(model.named_children()):
        if isinstance(child, nn.ReLU):
            setattr(model, name, make())
            count += 1
        else:
            count += swap_activation(child, make)
    return count


def resnet152(activation: str = "relu", num_classes: int = 1000) -> nn.Module:
    """ResNet-152 (60,192,808 parameters with 1,000 classes); ``activation`` is ``relu``,
    ``gelu``, ``silu`` or ``sigmoid``. torchvision's Bottleneck calls one ``self.relu`` module
    three times; swapping the module swaps all three calls."""
    import torchvision

    makers = {"gelu": nn.GELU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid}
    model = torchvision.models.resnet152(weights=None, num_classes=num_classes)
    if activation != "relu":
        swap_activation(model, makers[activation])
    return model


def weights_enum(tag: str) -> list[torchvision.models.WeightsEnum]:
    import torchvision

    return [getattr(torchvision.models.ResNet152_Weights, t) for t in IMAGENET_FILES[tag]]


def hub_file(weights: torchvision.models.WeightsEnum):
    from pathlib import Path

    return Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]
