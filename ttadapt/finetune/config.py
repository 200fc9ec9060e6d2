"""The typed configuration of a fine-tuning run: nested dataclasses that a YAML recipe and dotted
command-line overrides fill (see :mod:`ttadapt.config`), checked before any data is read."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from .. import models as zoo
from ..config import ConfigError, check_ranges, load_config
from ..data import DataError, check_fits, list_datasets
from ..optim import OPTIMIZERS
from ..optim.anchors import STORAGES
from ..optim.factory import check_optimizer

__all__ = ["FinetuneConfig", "ModelConfig", "DataConfig", "OptimConfig", "MethodConfig", "ScheduleConfig",
           "load_finetune_config", "METHODS"]

METHODS = ("plain", "ag1", "ag2", "ag3", "ag3_1", "sam")


@dataclass
class ModelConfig:
    """A zoo model (``ttadapt models``) and its starting weights."""

    name: str = "resnet152"
    weights: str | None = "imagenet"  # None (random), a named weight, or a .pt/.pth/.safetensors path
    num_classes: int | None = None  # default: the weights' head (1,000 for ImageNet)
    download: bool = False  # allow fetching named weights that are not in the local cache


@dataclass
class DataConfig:
    """Training and evaluation data. ``imagefolder``: ``train``/``val`` are folders of class
    sub-folders (the ImageNet-OOD layout) and ``class_map`` maps folder names to the model's class
    indices (e.g. WordNet ids → ImageNet-1k); other names are registered datasets (``mnist5k``,
    ``mnist``, ``fashion_mnist``, ``imdb``) whose ``train``/``test`` splits are used, with
    ``options`` passed to the loader (``root``, ``download``)."""

    name: str = "imagefolder"
    train: str | None = None
    val: str | None = None
    class_map: str | None = None
    image_size: int = 224
    eval_resize: int | None = None  # default: image_size · 256 / 224
    augment: bool = True  # RandomResizedCrop + horizontal flip on imagefolder training images
    batch_size: int = 64  # the global batch (split across processes)
    eval_batch_size: int | None = None  # default: batch_size
    num_workers: int = 4
    train_limit: int | None = None  # use only the first N training examples (smoke runs)
    val_limit: int | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """The base optimizer (``rmsprop``, ``adam``, ``adamw``, ``sgd``, ``soap``) with the paper's
    defaults; ``options`` overrides them (``weight_decay``, ``betas``, ``momentum``, ...)."""

    name: str = "soap"
    lr: float = 3e-3
    max_grad_norm: float | None = None  # clip the gradient each step takes to this global L2 norm (None: no clipping)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodConfig:
    """How the update is made: ``plain``, ``ag1`` / ``ag2`` (forward-looking; ``linear`` for
    their Linear variants), ``ag3`` (anchor period ``d``), ``ag3_1`` (AG-3 with d = 1) or
    ``sam`` (radius ``rho``, ``adaptive`` for ASAM). ``measure_batch_loss`` (AG-1/AG-2): one more
    no-graph forward per step gives the loss after the update, so that the run reports the
    paper's batch-loss improvement over the ordinary update of the same L1 length."""

    name: Literal["plain", "ag1", "ag2", "ag3", "ag3_1", "sam"] = "ag3"
    d: int = 300
    linear: bool = False
    measure_batch_loss: bool = False
    anchor_storage: Literal["device", "cpu", "disk"] = "device"
    anchor_dir: str | None = None
    rho: float = 0.05
    adaptive: bool = False


@dataclass
class ScheduleConfig:
    """Learning-rate schedule over optimizer steps: ``constant``, ``cosine`` (to
    ``min_lr_ratio``·lr) or ``step`` (× ``gamma`` every ``step_size`` steps), after a linear
    warm-up of ``warmup_steps``."""

    name: Literal["constant", "cosine", "step"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    step_size: int = 1000
    gamma: float = 0.1


@dataclass
class FinetuneConfig:
    """A fine-tuning run (the YAML recipes in ``recipes/`` fill it)."""

    name: str = "finetune"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimizer steps (the schedule spans them)
    seed: int = 0
    out: str | None = None  # default: runs/<name>
    checkpoint_every: int = 500  # optimizer steps; 0: only at the end
    eval_every: int = 1  # epochs; 0: never
    log_every: int = 10  # optimizer steps
    amp: Literal["auto", "off", "bf16"] = "auto"  # auto: bfloat16 autocast on CUDA, off on CPU
    device: str = "auto"  # auto: this rank's CUDA device if there is one, else cpu


def validate(config: FinetuneConfig) -> None:
    """Every problem a run would meet late, reported before any data or weights are read."""
    zoo_names = zoo.list_models()
    if config.model.name not in zoo_names:
        raise ConfigError(f"model.name: unknown model {config.model.name!r}; available: {', '.join(zoo_names)}")
    if config.data.name not in list_datasets():
        raise ConfigError(f"data.name: unknown dataset {config.data.name!r}; available: {', '.join(list_datasets())}")
    try:
        check_fits(config.model.name, config.data.name)
    except DataError as err:
        raise ConfigError(f"model.name and data.name: {err}") from err
    if config.data.name == "imagefolder" and not config.data.train:
        raise ConfigError("data.train: imagefolder needs the training folder (data.train=PATH)")
    if config.optim.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name: unknown optimizer {config.optim.name!r}; available: {', '.join(OPTIMIZERS)}")
    if config.method.anchor_storage not in STORAGES:
        raise ConfigError(f"method.anchor_storage must be one of {', '.join(STORAGES)}")
    positive, non_negative = "must be >= 1", "must be >= 0"
    checks = [
        ("epochs", config.epochs, config.epochs >= 1, positive),
        ("data.batch_size", config.data.batch_size, config.data.batch_size >= 1, positive),
        ("optim.lr", config.optim.lr, config.optim.lr > 0, "must be > 0"),
        ("method.d", config.method.d, config.method.d >= 1, positive),
        ("optim.max_grad_norm", config.optim.max_grad_norm,
         config.optim.max_grad_norm is None or config.optim.max_grad_norm > 0, "must be > 0 (or null: no clipping)"),
        ("method.rho", config.method.rho, config.method.rho >= 0, non_negative),
        ("checkpoint_every", config.checkpoint_every, config.checkpoint_every >= 0, non_negative + " (0: only at the end)"),
        ("eval_every", config.eval_every, config.eval_every >= 0, non_negative + " (0: never)"),
        ("log_every", config.log_every, config.log_every >= 1, positive),
        ("data.num_workers", config.data.num_workers, config.data.num_workers >= 0, non_negative),
        ("data.image_size", config.data.image_size, config.data.image_size >= 1, positive),
        ("schedule.warmup_steps", config.schedule.warmup_steps, config.schedule.warmup_steps >= 0, non_negative),
        ("schedule.step_size", config.schedule.step_size, config.schedule.step_size >= 1, positive),
    ]
    for key, value in (("max_steps", config.max_steps), ("data.train_limit", config.data.train_limit),
                       ("data.val_limit", config.data.val_limit), ("data.eval_batch_size", config.data.eval_batch_size)):
        checks.append((key, value, value is None or value >= 1, positive + " (or null)"))
    check_ranges(checks)
    try:
        check_optimizer(config.optim.name, config.optim.lr, config.optim.options)
    except ValueError as err:
        raise ConfigError(f"optim.options {config.optim.options!r} do not fit {config.optim.name}: {err}") from err


def load_finetune_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> FinetuneConfig:
    """A :class:`FinetuneConfig` from a YAML recipe and dotted overrides (``optim.lr=1e-3``,
    ``--method.name sam``); raises :class:`~ttadapt.config.ConfigError` on any problem."""
    config = load_config(FinetuneConfig, path, overrides)
    validate(config)
    return config


