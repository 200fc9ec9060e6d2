"""Training data for fine-tuning that resumes exactly: a sampler that starts at any batch of any
epoch and shards global batches across processes, per-sample seeded augmentation, and the
datasets and transforms a config names."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from .. import models as zoo
from ..data import load as load_data
from .config import DataConfig, FinetuneConfig

__all__ = ["EpochSampler", "SeededItems", "image_transforms", "datasets", "labels_of", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class EpochSampler(Sampler[int]):
    """This rank's share of the epoch's global batches, from any batch on.

    Epoch ``e`` uses a permutation seeded by ``(seed, e)``, cut into ``batches_per_epoch`` global
    batches of ``batch_size · world`` samples (the rest is dropped); rank ``r`` takes positions
    ``r, r + world, ...`` of each, so the union over ranks is the global batch a single process
    with batch ``batch_size · world`` takes. :meth:`set_epoch` chooses the epoch and the first
    batch (to continue a run where it stopped).
    """

    def __init__(self, length: int, batch_size: int, *, seed: int = 0, rank: int = 0, world: int = 1, shuffle: bool = True) -> None:
        self.length, self.batch_size, self.seed, self.rank, self.world, self.shuffle = length, batch_size, seed, rank, world, shuffle
        self.batches_per_epoch = length // (batch_size * world)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def __iter__(self) -> Iterator[int]:
        used = self.batches_per_epoch * self.batch_size * self.world
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        else:
            order = torch.arange(self.length)
        mine = order[:used][self.rank::self.world]
        return iter(mine[self.start * self.batch_size:].tolist())

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start) * self.batch_size


class SeededItems(Dataset):
    """Item ``i`` of epoch ``e`` drawn with the CPU RNG seeded by ``(seed, e, i)``: random
    augmentations independent of worker processes and of where a run was resumed."""

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base, self.seed, self.epoch = base, seed, 0

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(i))
            return self.base[i]


class _Subset(Dataset):
    def __init__(self, base: Dataset, n: int) -> None:
        self.base, self.n = base, min(n, len(base))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if i >= self.n:
            raise IndexError(i)
        return self.base[i]


def image_transforms(config: DataConfig, model_input: str) -> tuple[Callable, Callable]:
    from torchvision import transforms as T

    size = config.image_size
    resize = config.eval_resize or int(round(size * 256 / 224))
    if model_input == "mnist":
        tail = [T.Grayscale(1), T.ToTensor()]
    else:
        tail = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if model_input == "mnist":
        evaluation = T.Compose([T.Resize((size, size)), *tail])
        train = T.Compose([T.RandomResizedCrop(size, scale=(0.8, 1.0)), *tail]) if config.augment else evaluation
        return train, evaluation
    evaluation = T.Compose([T.Resize(resize), T.CenterCrop(size), *tail])
    train = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *tail]) if config.augment else evaluation
    return train, evaluation


def datasets(config: FinetuneConfig) -> tuple[Dataset, Dataset | None]:
    data = config.data
    if data.name == "imagefolder":
        from ..data import imagefolder

        model_input = zoo.model_info(config.model.name).input
        train_tf, eval_tf = image_transforms(data, model_input)
        train = imagefolder(data.train, transform=train_tf, class_map=data.class_map)
        val = imagefolder(data.val, transform=eval_tf, class_map=data.class_map) if data.val else None
    else:
        train = load_data(data.name, "train", **data.options)
        val = load_data(data.name, "test", **data.options)
    if data.train_limit is not None:
        train = _Subset(train, data.train_limit)
    if val is not None and data.val_limit is not None:
        val = _Subset(val, data.val_limit)
    return train, val


def labels_of(ds: Dataset) -> list[int] | None:
    """Every label of ``ds`` without loading images, where the dataset says them."""
    base, n = ds, None
    if isinstance(ds, _Subset):
        base, n = ds.base, ds.n
    targets = getattr(base, "targets", None)
    if targets is None and hasattr(base, "tensors"):
        targets = base.tensors[1]
    if targets is None:
        return None
    labels = [int(t) for t in (targets.tolist() if isinstance(targets, Tensor) else targets)]
    return labels[:n] if n is not None else labels


