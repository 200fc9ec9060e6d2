"""Reading a user's batch for ``ttadapt adapt``: image files (a folder, a glob, one file) or a
tensor file, preprocessed as the model expects; labels from a small file; outputs written
atomically."""

from __future__ import annotations

import csv
import glob as globlib
import io
import json
from dataclasses import dataclass
from pathlib import Path


import torch
from torch import Tensor

from .atomic import write_bytes_atomically as write_atomically

__all__ = ["BatchError", "Batch", "read_batch", "read_labels", "input_range_note", "write_atomically", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class BatchError(ValueError):
    """Input the command cannot use, with what is wrong."""


@dataclass
class Batch:
    x: Tensor
    names: list[str]
    labels: Tensor | None = None


def _preprocess(kind: str):
    import torchvision.transforms as T

    if kind == "mnist":
        return T.Compose([T.Grayscale(1), T.Resize((28, 28)), T.ToTensor()])
    from torchvision.models import ResNet152_Weights

    return ResNet152_Weights.IMAGENET1K_V2.transforms()


def _image_files(spec: str) -> list[Path]:
    path = Path(spec)
    if path.is_dir():
        # a folder's images only: a labels file or a README often sits beside them
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise BatchError(f"batch folder {spec!r} is empty")
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise BatchError(f"batch folder {spec!r} holds no images ({', '.join(IMAGE_SUFFIXES)}): "
                             f"{len(files)} other file(s), e.g. {files[0].name}")
        return images
    if path.is_file():
        return [path]
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in globlib.glob(spec) if Path(p).is_file())
        if not files:
            raise BatchError(f"no files match {spec!r}")
        return files
    raise BatchError(f"batch {spec!r} does not exist (give a folder of images, a glob, an image or a .pt file)")


def read_batch(spec: str, kind: str) -> Batch:
    """``kind`` is the model's input kind: ``"mnist"``, ``"imagenet"`` or ``"tokens"``."""
    if spec.endswith((".pt", ".pth")) and Path(spec).is_file():
        return _read_tensor_file(Path(spec), kind)
    if kind == "tokens":
        raise BatchError("this model reads token ids: give a .pt file holding an int64 tensor (N, L)")
    from PIL import Image, UnidentifiedImageError

    transform = _preprocess(kind)
    images, names = [], []
    for f in _image_files(spec):
        try:
            with Image.open(f) as im:
                images.append(transform(im.convert("RGB")))
        except (UnidentifiedImageError, OSError) as exc:
            raise BatchError(f"{f} is not an image this command can read ({type(exc).__name__})") from exc
        names.append(f.name)
    return Batch(torch.stack(images), names)


def _read_tensor_file(path: Path, kind: str) -> Batch:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BatchError(f"{path} is not a tensor file this command can read ({type(exc).__name__})") from exc
    labels = None
    if isinstance(obj, dict):
        x = obj.get("x", obj.get("images", obj.get("input_ids")))
        labels = obj.get("y", obj.get("labels"))
    else:
        x = obj
    if not isinstance(x, Tensor):
        raise BatchError(f"{path} must hold a tensor, or a dict with 'x' (and optionally 'y')")
    if kind == "tokens":
        if x.dtype not in (torch.int32, torch.int64) or x.dim() != 2:
            raise BatchError(f"{path}: token batches are int64 tensors (N, L), got {x.dtype} {tuple(x.shape)}")
        x = x.long()
    else:
        want = 1 if kind == "mnist" else 3
        if not x.is_floating_point() or x.dim() != 4:
            raise BatchError(f"{path}: image batches are float tensors (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
        if x.shape[1] != want:
            raise BatchError(f"{path}: the model takes {want}-channel images, the batch has {x.shape[1]} channels")
    if labels is not None and not isinstance(labels, Tensor):
        raise BatchError(f"{path}: 'y' must be a tensor of class indices")
    return Batch(x, [f"{path.name}[{i}]" for i in range(len(x))], None if labels is None else labels.long())


def input_range_note(x: Tensor, kind: str) -> str | None:
    """A warning when a tensor batch's values do not look like the model's preprocessing: pixel
    values 0–255, or [0, 1] images for an ImageNet model that expects mean/std-normalised input
    (values about −2.1 to 2.6). ``None`` when they look right (or the kind has no convention)."""
    if kind not in ("mnist", "imagenet") or not x.is_floating_point() or x.numel() == 0:
        return None
    lo, hi = float(x.min()), float(x.max())
    if hi > 10:
        return f"the batch's values reach {hi:g}: pixel values 0-255? this model takes " + (
            "[0, 1] images" if kind == "mnist" else "ImageNet mean/std-normalised images")
    if kind == "imagenet" and lo >= 0 and hi <= 1:
        return ("the batch's values lie in [0, 1]: this model takes ImageNet mean/std-normalised images "
                "(subtract (0.485, 0.456, 0.406), divide by (0.229, 0.224, 0.225))")
    if kind == "mnist" and lo < -0.5:
        return f"the batch's values go down to {lo:g}: this model takes [0, 1] images, not normalised ones"
    return None


def read_labels(path: str, names: list[str], num_classes: int) -> Tensor:
    """Labels from ``.txt`` (one per line), ``.json`` (a list, or ``{name: label}``) or ``.csv``
    (``name,label`` rows or one label per row), in the batch's order."""
    p = Path(path)
    if not p.is_file():
        raise BatchError(f"labels file {path!r} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".json":
            obj = json.loads(text)
            values = [obj[n] for n in names] if isinstance(obj, dict) else list(obj)
        elif p.suffix.lower() == ".csv":
            rows = [r for r in csv.reader(io.StringIO(text)) if r and not r[0].startswith("#")]
            if rows and not rows[0][-1].strip().lstrip("-").isdigit():
                rows = rows[1:]  # header
            if rows and len(rows[0]) >= 2:
                table = {r[0]: r[1] for r in rows}
                values = [table[n] for n in names] if all(n in table for n in names) else [r[1] for r in rows]
            else:
                values = [r[0] for r in rows]
        else:
            values = [line.split()[0] for line in text.splitlines() if line.strip()]
        labels = torch.tensor([int(v) for v in values], dtype=torch.long)
    except (KeyError, ValueError, TypeError, json.JSONDecodeError) as exc:
        raise BatchError(f"{path}: cannot read one integer label per input ({type(exc).__name__}: {exc})") from exc
    if len(labels) != len(names):
        raise BatchError(f"{path} has {len(labels)} labels for a batch of {len(names)} inputs")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise BatchError(f"{path}: labels must be class indices from 0 to {num_classes - 1}")
    return labels


def serialize_state(state: dict[str, Tensor], suffix: str) -> bytes:
    if suffix == ".safetensors":
        from safetensors.torch import save

        return save({k: v.contiguous() for k, v in state.items()})
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


