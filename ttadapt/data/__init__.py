"""Datasets ready for the zoo's models, and ImageNet-C-style distribution shifts.

    >>> from ttadapt import data
    >>> train = data.load("mnist5k", "train")          # TensorDataset, offline
    >>> x, y = train.tensors
    >>> x_c = data.shifts.apply(x[:128], "gaussian_noise", severity=3, seed=0)

``load(name, split, **options)`` dispatches to ``mnist5k``, ``mnist``, ``fashion_mnist``,
``imdb``, ``imagefolder``.
"""

from __future__ import annotations

from typing import Any, Callable

from torch.utils.data import Dataset

from . import shifts
from .images import MNIST5K_SPLIT, DataError, fashion_mnist, imagefolder, mnist, mnist5k, read_class_map
from .shifted import ShiftedDataset
from .text import Vocabulary, imdb, tokenize

__all__ = ["load", "list_datasets", "input_kind", "check_fits", "DataError", "mnist5k", "mnist", "fashion_mnist", "imdb", "imagefolder",
           "shifts", "ShiftedDataset", "Vocabulary", "tokenize", "read_class_map", "MNIST5K_SPLIT"]

_LOADERS: dict[str, Callable[..., Dataset]] = {
    "mnist5k": mnist5k,
    "mnist": mnist,
    "fashion_mnist": fashion_mnist,
    "imdb": imdb,
}


def list_datasets() -> list[str]:
    return [*_LOADERS, "imagefolder"]


# what each dataset gives, in the zoo's terms for a model's input (``ModelInfo.input``); an image
# folder's images are transformed for whichever image model reads them
_INPUT_KINDS = {"mnist5k": "mnist", "mnist": "mnist", "fashion_mnist": "mnist", "imdb": "tokens", "imagefolder": "images"}
_DESCRIBED = {"mnist": "1×28×28 grey images", "imagenet": "3-channel images", "tokens": "token ids",
              "images": "images"}


def input_kind(name: str) -> str:
    """What dataset ``name`` gives: ``"mnist"`` (1×28×28 in [0, 1]), ``"tokens"`` or ``"images"``
    (an image folder, transformed for the model)."""
    if name not in _INPUT_KINDS:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}")
    return _INPUT_KINDS[name]


def check_fits(model: str, data: str) -> None:
    """Raise :class:`DataError` with one line if zoo model ``model`` cannot read dataset ``data``
    (by the model's ``ModelInfo.input``) — before any data is read or step is run."""
    from ..models import model_info  # (the zoo sits beside the data, not below it)

    model_input = model_info(model).input

    def fits(kind: str) -> bool:
        return kind == model_input or (kind == "images" and model_input in ("mnist", "imagenet"))

    kind = input_kind(data)
    if not fits(kind):
        wanted = [n for n in list_datasets() if fits(_INPUT_KINDS[n])]
        raise DataError(f"{model} takes {_DESCRIBED[model_input]} and {data} gives {_DESCRIBED[kind]}; "
                        f"datasets for {model}: {', '.join(wanted) or 'none registered'}")


def load(name: str, split: str = "train", **options: Any) -> Dataset:
    """Load dataset ``name`` (see :func:`list_datasets`); ``imagefolder`` takes ``root=``."""
    if name == "imagefolder":
        if "root" not in options:
            raise DataError("imagefolder needs root= (a folder of class sub-folders)")
        return imagefolder(**options)
    if name not in _LOADERS:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}")
    return _LOADERS[name](split, **options)
