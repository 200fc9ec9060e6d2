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

__all__ = ["load", "list_datasets", "DataError", "mnist5k", "mnist", "fashion_mnist", "imdb", "imagefolder",
           "shifts", "ShiftedDataset", "Vocabulary", "tokenize", "read_class_map", "MNIST5K_SPLIT"]

_LOADERS: dict[str, Callable[..., Dataset]] = {
    "mnist5k": mnist5k,
    "mnist": mnist,
    "fashion_mnist": fashion_mnist,
    "imdb": imdb,
}


def list_datasets() -> list[str]:
    return [*_LOADERS, "imagefolder"]


def load(name: str, split: str = "train", **options: Any) -> Dataset:
    """Load dataset ``name`` (see :func:`list_datasets`); ``imagefolder`` takes ``root=``."""
    if name == "imagefolder":
        if "root" not in options:
            raise DataError("imagefolder needs root= (a folder of class sub-folders)")
        return imagefolder(**options)
    if name not in _LOADERS:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}")
    return _LOADERS[name](split, **options)
