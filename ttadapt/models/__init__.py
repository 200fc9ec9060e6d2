"""The model zoo: the paper's Models A–C and ResNet-152 variants, by name (timm-style).

    >>> import ttadapt
    >>> ttadapt.models.list_models()
    ['model_a', 'model_b', 'model_c', 'resnet152', 'resnet152_gelu', 'resnet152_silu', 'resnet152_sigmoid']
    >>> model = ttadapt.models.create("model_b", weights="mnist5k")     # shipped checkpoint
    >>> model = ttadapt.models.create("resnet152_gelu", num_classes=200, weights="imagenet")

``weights``: ``None`` (random initialisation); a path to a ``.pt``/``.pth``/``.safetensors``
state dict (or a ttadapt checkpoint), loaded with ``weights_only=True``; ``"imagenet"`` for the
ResNets (torchvision's IMAGENET1K weights from the local torch hub cache — nothing is downloaded
unless ``download=True``); ``"mnist5k"`` for Models A and B (the checkpoints that ship with the
package). With ``num_classes`` different from the weights', the classifier head is replaced by a
freshly initialised one.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torch import nn

from . import resnet as _resnet
from .small import ModelA, ModelB, ModelC
from .weights import CHECKPOINT_FORMAT, WeightsError, load_into, read_state_dict, shipped_checkpoint

__all__ = ["create", "list_models", "num_classes_of", "register_model", "model_info", "ModelInfo", "WeightsError", "count_parameters",
           "CHECKPOINT_FORMAT", "ModelA", "ModelB", "ModelC"]


@dataclass(frozen=True)
class ModelInfo:
    """What the zoo knows about one model."""

    name: str
    build: Callable[[int], nn.Module]
    num_classes: int
    input: str  # "mnist" (1×28×28 in [0, 1]), "imagenet" (3×H×W, ImageNet-normalised), "tokens"
    paper_parameters: int | None
    head: tuple[str, ...]  # state-dict prefixes of the classifier head
    description: str
    weights: tuple[str, ...] = field(default=())  # named weights besides paths


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(info: ModelInfo) -> ModelInfo:
    """Add a model to the zoo (one entry per name)."""
    if info.name in _REGISTRY:
        raise ValueError(f"a model named {info.name!r} is already registered")
    _REGISTRY[info.name] = info
    return info


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, optionally filtered by a shell-style ``pattern`` (``"resnet*"``)."""
    names = list(_REGISTRY)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def model_info(name: str) -> ModelInfo:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def create(name: str, *, num_classes: int | None = None, weights: str | os.PathLike | None = None,
           download: bool = False) -> nn.Module:
    """Build zoo model ``name`` (see the module docstring for ``weights``)."""
    info = model_info(name)
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    classes = num_classes or info.num_classes
    if weights is None:
        return info.build(classes)
    if isinstance(weights, str) and weights in info.weights:
        state, source = _named_weights(info, weights, download)
    elif isinstance(weights, (str, os.PathLike)):
        if isinstance(weights, str) and not Path(weights).suffix and not Path(weights).exists():
            named = ", ".join(repr(w) for w in info.weights) or "none"
            raise WeightsError(f"unknown weights {weights!r} for {name}; named weights: {named}; or give a path to a "
                               ".pt/.pth/.safetensors file (random weights: None in Python, null in a recipe)")
        state, meta = read_state_dict(weights)
        source = str(weights)
        if meta.get("model") not in (None, name):
            raise WeightsError(f"{weights} is a checkpoint of {meta['model']!r}, not of {name!r}")
    else:
        raise TypeError(f"weights must be None, a name or a path, got {type(weights).__name__}")
    trained_classes = _head_classes(info, state)
    model = info.build(trained_classes if trained_classes else classes)
    load_into(model, state, source)
    if trained_classes and classes != trained_classes:
        model = _replace_head(info, model, classes)
    return model


def _head_classes(info: ModelInfo, state: dict) -> int | None:
    for key, value in state.items():
        if key.removeprefix("module.").startswith(info.head) and key.endswith("weight") and value.dim() == 2:
            return int(value.shape[0])
    return None


def num_classes_of(name: str, model: nn.Module) -> int:
    """How many classes the head of zoo model ``name`` (built and possibly loaded) predicts."""
    info = model_info(name)
    return _head_classes(info, model.state_dict()) or info.num_classes


def _replace_head(info: ModelInfo, model: nn.Module, classes: int) -> nn.Module:
    fresh = info.build(classes)
    head_state = {k: v for k, v in fresh.state_dict().items() if k.startswith(info.head)}
    model_state = model.state_dict()
    model_state.update(head_state)
    fresh.load_state_dict(model_state)
    return fresh


def _named_weights(info: ModelInfo, tag: str, download: bool) -> tuple[dict, str]:
    if tag == "mnist5k":
        path = shipped_checkpoint(info.name, tag)
        if not path.is_file():
            raise WeightsError(f"the shipped checkpoint {path} is missing from this installation; train one with "
                               f"`ttadapt train --model {info.name} --data mnist5k`")
        return read_state_dict(path)[0], str(path)
    # ImageNet weights for the ResNets
    import torch

    candidates = _resnet.weights_enum(tag)
    for w in candidates:
        path = _resnet.hub_file(w)
        if path.is_file():
            return read_state_dict(path)[0], str(path)
    if download:
        w = candidates[0]
        try:
            state = torch.hub.load_state_dict_from_url(w.url, progress=True, weights_only=True, map_location="cpu")
        except (OSError, RuntimeError) as exc:  # (urllib's URLError is an OSError)
            reason = " ".join(str(getattr(exc, "reason", None) or exc).split())
            raise WeightsError(f"could not download ImageNet weights for {info.name} from {w.url} ({reason}); "
                               f"copy that file to {_resnet.hub_file(w)} instead") from exc
        return dict(state), w.url
    files = " or ".join(str(_resnet.hub_file(w)) for w in candidates)
    raise WeightsError(
        f"ImageNet weights for {info.name} are not in the local torch hub cache: expected {files}. "
        f"Copy torchvision's file there (from {candidates[0].url}), or pass download=True "
        "(`--download` on the command line) to fetch it"
    )


register_model(ModelInfo("model_a", lambda c: ModelA(c), 10, "mnist", 17_506, ("14.",),
                         "6 × Conv2d+ELU, global average pool, 1 × Linear; 1×28×28 inputs", ("mnist5k",)))
register_model(ModelInfo("model_b", lambda c: ModelB(c), 10, "mnist", 8_228, ("61.",),
                         "2 × Conv2d+ELU+MaxPool, 28 × Linear with Tanh (10 units); 1×28×28 inputs", ("mnist5k",)))
register_model(ModelInfo("model_c", lambda c: ModelC(c), 2, "tokens", 14_397, ("head.8.",),
                         "token embedding, 41 × Conv2d+Tanh, 5 × Linear with Tanh; token ids"))
for _act in ("relu", "gelu", "silu", "sigmoid"):
    register_model(ModelInfo(
        "resnet152" if _act == "relu" else f"resnet152_{_act}",
        (lambda a: (lambda c: _resnet.resnet152(a, c)))(_act),
        1000, "imagenet", 60_192_808, ("fc.",),
        "torchvision ResNet-152" + ("" if _act == "relu" else f", ReLU → {dict(gelu='GELU', silu='SiLU', sigmoid='Sigmoid')[_act]}"),
        ("imagenet", "imagenet_v1", "imagenet_v2"),
    ))
