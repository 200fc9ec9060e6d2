"""Loading weights into zoo models: state-dict files, shipped checkpoints, ImageNet weights from
the local torch hub cache. Everything is loaded with ``weights_only=True``: a file that carries
code is refused, not executed."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

__all__ = ["WeightsError", "read_state_dict", "load_into", "CHECKPOINT_FORMAT", "shipped_checkpoint"]

CHECKPOINT_FORMAT = "ttadapt-checkpoint/1"
_SHIPPED_DIR = Path(__file__).resolve().parent / "checkpoints"


class WeightsError(ValueError):
    """A weights file that cannot be used: missing, unreadable, unsafe, or not matching the model."""


def shipped_checkpoint(model: str, data: str) -> Path:
    """The checkpoint that ships with the package for ``model`` trained on ``data``."""
    return _SHIPPED_DIR / f"{model}_{data}.pt"


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a ``.pt``/``.pth`` (``torch.save`` of a state dict or of a ttadapt checkpoint) or
    ``.safetensors`` file. Returns ``(state_dict, metadata)``."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise WeightsError("reading .safetensors files needs the 'safetensors' package (pip install safetensors)") from exc
        try:
            return dict(load_file(str(path))), {}
        except Exception as exc:  # safetensors raises its own error types
            raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from exc
    if suffix not in (".pt", ".pth", ".bin", ".ckpt"):
        raise WeightsError(f"{path}: unknown weights format {suffix!r}; use .pt, .pth or .safetensors")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"{path}: refused to load — the file holds Python objects other than tensors (it could run code); "
            "only plain state dicts are accepted (torch.load(..., weights_only=True))"
        ) from exc
    except Exception as exc:
        raise WeightsError(f"{path}: not a readable PyTorch file ({type(exc).__name__}: {exc})") from exc
    meta: dict[str, Any] = {}
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
        obj = obj["state_dict"]
    elif isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    elif isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: does not hold a state dict (a mapping from names to tensors)")
    return dict(obj), meta


def load_into(model: nn.Module, state: Mapping[str, Tensor], source: str, *, skip_head: tuple[str, ...] = ()) -> None:
    """Copy ``state`` into ``model``; raise one :class:`WeightsError` naming every missing,
    unexpected and mis-shaped key. Keys starting with one of ``skip_head`` are left out (a
    replaced classifier head)."""
    own = model.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith(skip_head or ("\0",))}
    expected = {k for k in own if not k.startswith(skip_head or ("\0",))}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in set(state) & set(own) if state[k].shape != own[k].shape)
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            problems.append(f"{len(keys)} {what} ({shown})")
    if problems:
        raise WeightsError(f"{source} does not fit this model: " + "; ".join(problems))
    model.load_state_dict(state, strict=not skip_head)
