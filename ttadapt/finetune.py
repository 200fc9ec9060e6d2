"""``ttadapt finetune``: fine-tune a zoo model with a plain optimizer, AG-3, AG-3-1 or SAM — one
process or many (``torchrun`` / DistributedDataParallel), with atomic checkpoints and exact resume.

    from ttadapt.finetune import load_finetune_config, finetune
    config = load_finetune_config("recipes/resnet152_imagenet_ood_ag3.yaml", ["optim.lr=1e-3"])
    result = finetune(config)                      # or finetune(config, resume=True)

What a run writes into ``config.out`` (rank 0 only): ``config.yaml`` (the resolved config),
``log.txt``, ``metrics.jsonl`` (one line per evaluation), ``checkpoint.pt`` (every
``checkpoint_every`` steps and at the end, replaced atomically: model, optimizer wrapper with
AG-3's anchors, scheduler, every rank's RNG state, data position, history) and ``model.pt`` (the
final weights as a zoo checkpoint, usable as ``--weights`` elsewhere).

Exact resume: the data order of epoch ``e`` is a permutation seeded by ``(seed, e)``, random
augmentations of sample ``i`` in epoch ``e`` are seeded by ``(seed, e, i)`` (so they do not
depend on worker processes or on where a run was interrupted), the data loaders never draw from
the global RNG, and the checkpoint holds the RNG states (dropout). A run interrupted after a
checkpoint and resumed with ``resume=True`` ends with the same parameters, bit for bit, as an
uninterrupted one (same world size, CPU or deterministic kernels).

``data.batch_size`` is the global batch: with N processes each takes ``batch_size / N`` samples
of the same global batch a single process would take, so a recipe means the same on any number
of GPUs. AG-3 under DDP runs its no-graph anchor pass on the unwrapped module and its graph pass
through the DDP wrapper, so the reducer averages the averaged gradient across ranks; SAM's two
gradients are all-reduced explicitly (the perturbation is that of the global batch).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from . import models as zoo
from .atomic import torch_save_atomically, write_bytes_atomically
from .config import ConfigError, load_config, to_dict
from .data import DataError, list_datasets
from .data import load as load_data
from .models.weights import CHECKPOINT_FORMAT
from .optim import AG3, OPTIMIZERS, SAM, create_optimizer
from .optim.anchors import STORAGES
from .optim.base import all_finite

__all__ = ["FinetuneConfig", "ModelConfig", "DataConfig", "OptimConfig", "MethodConfig", "ScheduleConfig",
           "load_finetune_config", "finetune", "FinetuneResult", "EpochSampler", "RUN_FORMAT", "METHODS"]

RUN_FORMAT = "ttadapt-finetune/1"
METHODS = ("plain", "ag3", "ag3_1", "sam")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# -- configuration ------------------------------------------------------------------------------
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
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodConfig:
    """How the base optimizer's gradient is made: ``plain``, ``ag3`` (anchor period ``d``),
    ``ag3_1`` (AG-3 with d = 1) or ``sam`` (radius ``rho``, ``adaptive`` for ASAM)."""

    name: Literal["plain", "ag3", "ag3_1", "sam"] = "ag3"
    d: int = 300
    linear: bool = False
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


def _validate(config: FinetuneConfig) -> None:
    """Every problem a run would meet late, reported before any data or weights are read."""
    zoo_names = zoo.list_models()
    if config.model.name not in zoo_names:
        raise ConfigError(f"model.name: unknown model {config.model.name!r}; available: {', '.join(zoo_names)}")
    if config.data.name not in list_datasets():
        raise ConfigError(f"data.name: unknown dataset {config.data.name!r}; available: {', '.join(list_datasets())}")
    if config.data.name == "imagefolder" and not config.data.train:
        raise ConfigError("data.train: imagefolder needs the training folder (data.train=PATH)")
    if config.optim.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name: unknown optimizer {config.optim.name!r}; available: {', '.join(OPTIMIZERS)}")
    if config.method.anchor_storage not in STORAGES:
        raise ConfigError(f"method.anchor_storage must be one of {', '.join(STORAGES)}")
    checks = [
        ("epochs", config.epochs >= 1), ("data.batch_size", config.data.batch_size >= 1),
        ("optim.lr", config.optim.lr > 0), ("method.d", config.method.d >= 1), ("method.rho", config.method.rho >= 0),
        ("checkpoint_every", config.checkpoint_every >= 0), ("eval_every", config.eval_every >= 0),
        ("log_every", config.log_every >= 1), ("data.num_workers", config.data.num_workers >= 0),
        ("data.image_size", config.data.image_size >= 1), ("schedule.warmup_steps", config.schedule.warmup_steps >= 0),
        ("schedule.step_size", config.schedule.step_size >= 1),
        ("max_steps", config.max_steps is None or config.max_steps >= 1),
        ("data.train_limit", config.data.train_limit is None or config.data.train_limit >= 1),
        ("data.val_limit", config.data.val_limit is None or config.data.val_limit >= 1),
        ("data.eval_batch_size", config.data.eval_batch_size is None or config.data.eval_batch_size >= 1),
    ]
    bad = [name for name, ok in checks if not ok]
    if bad:
        raise ConfigError(f"invalid value for {', '.join(bad)} (counts must be positive, rates non-negative)")


def load_finetune_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> FinetuneConfig:
    """A :class:`FinetuneConfig` from a YAML recipe and dotted overrides (``optim.lr=1e-3``,
    ``--method.name sam``); raises :class:`~ttadapt.config.ConfigError` on any problem."""
    config = load_config(FinetuneConfig, path, overrides)
    _validate(config)
    return config


# -- distributed --------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_hint: str) -> _Dist:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1): NCCL on GPUs, gloo on CPU."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_hint in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), local, owns_group=True)


def _all_reduce_mean(world: int) -> Callable[[list[Tensor]], None]:
    import torch.distributed as dist

    def reduce(tensors: list[Tensor]) -> None:
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n

    return reduce


# -- data ---------------------------------------------------------------------------------------
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


class _SeededItems(Dataset):
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


def _image_transforms(config: DataConfig, model_input: str) -> tuple[Callable, Callable]:
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


def _datasets(config: FinetuneConfig) -> tuple[Dataset, Dataset | None]:
    data = config.data
    if data.name == "imagefolder":
        from .data import imagefolder

        model_input = zoo.model_info(config.model.name).input
        train_tf, eval_tf = _image_transforms(data, model_input)
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


def _labels_of(ds: Dataset) -> list[int] | None:
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


# -- schedule -----------------------------------------------------------------------------------
def _lr_factor(schedule: ScheduleConfig, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if schedule.warmup_steps and step < schedule.warmup_steps:
            return (step + 1) / schedule.warmup_steps
        if schedule.name == "constant":
            return 1.0
        if schedule.name == "step":
            return schedule.gamma ** (step // schedule.step_size)
        span = max(1, total_steps - schedule.warmup_steps)
        progress = min(1.0, (step - schedule.warmup_steps) / span)
        return schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# -- the run ------------------------------------------------------------------------------------
@dataclass
class FinetuneResult:
    out: Path
    steps: int
    history: list[dict[str, float]]
    skipped_steps: int
    seconds: float


class _Log:
    """Rank 0's log: a text file, a JSON-lines file of evaluations, and an optional echo."""

    def __init__(self, out: Path, enabled: bool, echo: Callable[[str], None] | None) -> None:
        self.enabled, self.echo = enabled, echo
        self.text = out / "log.txt"
        self.metrics = out / "metrics.jsonl"

    def line(self, message: str) -> None:
        if not self.enabled:
            return
        with open(self.text, "a", encoding="utf-8") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        if self.echo is not None:
            self.echo(message)

    def record(self, entry: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.metrics, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry) + "\n")


def _device(config: FinetuneConfig, dist_info: _Dist) -> torch.device:
    if config.device == "auto":
        return torch.device(f"cuda:{dist_info.local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(config.device)
    except RuntimeError as err:
        raise ConfigError(f"device: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but no CUDA device is available")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{dist_info.local_rank}")
    return device


def _autocast(config: FinetuneConfig, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    use = config.amp == "bf16" or (config.amp == "auto" and device.type == "cuda")
    if not use:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


_RESUME_FREE = {"epochs", "max_steps", "out", "checkpoint_every", "eval_every", "log_every", "device",
                "data.num_workers", "data.eval_batch_size", "data.val", "data.val_limit", "data.train", "data.class_map",
                "method.anchor_dir", "method.anchor_storage", "model.download", "data.options", "model.weights", "name"}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in ("data.options", "optim.options"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _check_resumable(saved: dict[str, Any], config: FinetuneConfig, path: Path) -> None:
    old, new = _flatten(saved), _flatten(to_dict(config))
    differ = sorted(k for k in set(old) | set(new) if k not in _RESUME_FREE and old.get(k) != new.get(k))
    if differ:
        shown = ", ".join(f"{k} ({old.get(k)!r} → {new.get(k)!r})" for k in differ[:4])
        raise ConfigError(f"{path} was written by a run with a different config: {shown}; resume with the same "
                          f"recipe (only {', '.join(sorted(k for k in _RESUME_FREE if '.' not in k))} may change) or use another out")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A fine-tuning checkpoint, read with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path} to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise ConfigError(f"{path} is not a readable fine-tuning checkpoint ({type(err).__name__}: {_one_line(err)})") from err
    if not isinstance(state, dict) or state.get("format") != RUN_FORMAT:
        raise ConfigError(f"{path} is not a ttadapt fine-tuning checkpoint")
    return state


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def finetune(
    config: FinetuneConfig,
    *,
    resume: bool | str | os.PathLike = False,
    echo: Callable[[str], None] | None = None,
    progress: Any = False,
    on_step: Callable[[int, float], None] | None = None,
) -> FinetuneResult:
    """Run ``config``; see the module docstring for what it writes.

    Args:
        resume: ``True`` continues from ``<out>/checkpoint.pt``, a path from that checkpoint.
        echo: called with every log line (rank 0), e.g. ``print``.
        progress: show a Rich progress bar (rank 0); ``True`` or the ``rich.console.Console`` to
            draw it on (the one ``echo`` prints to, so log lines appear above the bar).
        on_step: called after every optimizer step with ``(global step, rank-0 batch loss)``.
    """
    _validate(config)
    dist_info = _init_distributed(config.device)
    try:
        return _run(config, dist_info, resume, echo, progress, on_step)
    finally:
        if dist_info.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(config: FinetuneConfig, dist_info: _Dist, resume: bool | str | os.PathLike, echo: Callable[[str], None] | None,
         progress: Any, on_step: Callable[[int, float], None] | None) -> FinetuneResult:
    started = time.perf_counter()
    device = _device(config, dist_info)
    out = Path(config.out or f"runs/{config.name}")
    ckpt_path = out / "checkpoint.pt"
    saved: dict[str, Any] | None = None
    if resume:
        saved = read_checkpoint(ckpt_path if resume is True else Path(resume))
        _check_resumable(saved["config"], config, ckpt_path)
    if config.data.batch_size % dist_info.world:
        raise ConfigError(f"data.batch_size {config.data.batch_size} does not split over {dist_info.world} processes")
    per_rank = config.data.batch_size // dist_info.world

    train_set, val_set = _datasets(config)
    sampler = EpochSampler(len(train_set), per_rank, seed=config.seed, rank=dist_info.rank, world=dist_info.world)  # type: ignore[arg-type]
    if sampler.batches_per_epoch == 0:
        raise DataError(f"the training set has {len(train_set)} examples, fewer than one batch of {config.data.batch_size}")  # type: ignore[arg-type]
    torch.manual_seed(config.seed)
    model = zoo.create(config.model.name, num_classes=config.model.num_classes, weights=config.model.weights,
                       download=config.model.download)
    classes = zoo.num_classes_of(config.model.name, model)
    labels = _labels_of(train_set)
    if labels and (max(labels) >= classes or min(labels) < 0):
        raise DataError(f"the training labels reach {max(labels)} but {config.model.name} predicts {classes} classes; "
                        "set model.num_classes or data.class_map")
    model.to(device)
    train_items = _SeededItems(train_set, config.seed) if config.data.name == "imagefolder" and config.data.augment else train_set

    optimizer = create_optimizer(config.optim.name, model.parameters(), config.optim.lr, **config.optim.options)
    method = config.method
    wrapper: AG3 | SAM | None = None
    if method.name in ("ag3", "ag3_1"):
        wrapper = AG3(model, optimizer, d=1 if method.name == "ag3_1" else method.d, linear=method.linear,
                      anchor_storage=method.anchor_storage, anchor_dir=method.anchor_dir)
    elif method.name == "sam":
        wrapper = SAM(model, optimizer, rho=method.rho, adaptive=method.adaptive,
                      reduce=_all_reduce_mean(dist_info.world) if dist_info.world > 1 else None)
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = steps_per_epoch * config.epochs if config.max_steps is None else min(config.max_steps, steps_per_epoch * config.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config.schedule, total_steps))

    ddp: nn.Module | None = None
    if dist_info.world > 1:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        if method.name == "sam":  # no DDP wrapper: both gradients are all-reduced explicitly
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, 0)
        else:
            ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    net = ddp if ddp is not None else model

    state = {"epoch": 0, "batch": 0, "step": 0, "skipped": 0}
    history: list[dict[str, float]] = []
    if saved is not None:
        model.load_state_dict(saved["model"])
        (wrapper or optimizer).load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state.update(saved["position"])
        history = list(saved.get("history", []))
        rngs = saved["rng"]
        if len(rngs) != dist_info.world:
            warnings.warn(f"the checkpoint was written by {len(rngs)} process(es), this run has {dist_info.world}: "
                          "the continuation is valid but not bit-identical to an uninterrupted run", RuntimeWarning, stacklevel=2)
        _set_rng_state(rngs[dist_info.rank % len(rngs)], device)

    if dist_info.main:
        out.mkdir(parents=True, exist_ok=True)
        import yaml

        write_bytes_atomically(out / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False).encode())
    log = _Log(out, dist_info.main, echo)
    autocast = _autocast(config, device)
    log.line(f"{'resuming' if saved else 'starting'} {config.name}: {config.model.name} ({sum(p.numel() for p in model.parameters()):,} "
             f"parameters) on {config.data.name} ({len(train_set):,} train{f', {len(val_set):,} val' if val_set is not None else ''}), "  # type: ignore[arg-type]
             f"{config.optim.name} × {method.name}, global batch {config.data.batch_size} on {dist_info.world} process(es), "
             f"{device}, {total_steps} steps" + (f", from step {state['step']}" if saved else ""))

    def save(final: bool = False) -> None:
        rngs = _gather(_rng_state(device), dist_info)
        if not dist_info.main:
            return
        payload = {
            "format": RUN_FORMAT,
            "config": to_dict(config),
            "model": model.state_dict(),
            "optimizer": (wrapper or optimizer).state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rngs,
            "position": dict(state),
            "history": history,
            "world_size": dist_info.world,
            "torch": str(torch.__version__),
        }
        torch_save_atomically(payload, ckpt_path)
        if final:
            meta = {"data": config.data.name, "num_classes": classes, "config": to_dict(config), "history": history,
                    "torch": str(torch.__version__)}
            torch_save_atomically({"format": CHECKPOINT_FORMAT, "model": config.model.name, "state_dict": model.state_dict(), **meta},
                                  out / "model.pt")
        log.line(f"saved {'final ' if final else ''}checkpoint at step {state['step']}")

    loader_generator = torch.Generator()  # the loaders never draw from the global RNG

    def step_on(x: Tensor, y: Tensor) -> Tensor:
        def closure_on(module: nn.Module) -> Callable[[], Tensor]:
            def closure() -> Tensor:
                with autocast():
                    logits = module(x)
                return F.cross_entropy(logits.float(), y)
            return closure

        if wrapper is None:
            optimizer.zero_grad(set_to_none=True)
            loss = closure_on(net)()
            loss.backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if all_finite(*grads):
                optimizer.step()
            else:
                state["skipped"] += 1
                warnings.warn(f"non-finite gradient at step {state['step']}; the update was skipped", RuntimeWarning, stacklevel=2)
            return loss.detach()
        if isinstance(wrapper, AG3):
            before = wrapper.skipped_steps
            loss = wrapper.step(closure_on(net), anchor_closure=closure_on(model))
        else:
            before = wrapper.skipped_steps
            loss = wrapper.step(closure_on(model))
        state["skipped"] += wrapper.skipped_steps - before
        return loss

    bar = _progress_bar(bool(progress) and dist_info.main, total_steps, state["step"], config.name,
                        None if isinstance(progress, bool) else progress)
    window: list[Tensor] = []
    window_start, window_steps = time.perf_counter(), 0
    with bar as task_update:
        while state["epoch"] < config.epochs and state["step"] < total_steps:
            epoch = state["epoch"]
            if state["batch"] < steps_per_epoch:
                model.train()
                sampler.set_epoch(epoch, state["batch"])
                if isinstance(train_items, _SeededItems):
                    train_items.epoch = epoch
                loader = DataLoader(train_items, batch_size=per_rank, sampler=sampler, drop_last=True,
                                    num_workers=config.data.num_workers, pin_memory=device.type == "cuda",
                                    generator=loader_generator, persistent_workers=False)
                for x, y in loader:
                    x = x.to(device, non_blocking=True)
                    y = y.to(device, non_blocking=True)
                    loss = step_on(x, y)
                    scheduler.step()
                    state["step"] += 1
                    state["batch"] += 1
                    window.append(loss)
                    window_steps += 1
                    if on_step is not None:
                        on_step(state["step"], float(loss))
                    task_update(state["step"], float(loss) if state["step"] % config.log_every == 0 else None)
                    if state["step"] % config.log_every == 0:
                        seconds = time.perf_counter() - window_start
                        mean = float(torch.stack(window).float().mean())
                        log.line(f"epoch {epoch + 1} step {state['step']}/{total_steps} loss {mean:.4f} lr {scheduler.get_last_lr()[0]:.3g} "
                                 f"{window_steps * config.data.batch_size / max(seconds, 1e-9):.1f} img/s")
                        window, window_start, window_steps = [], time.perf_counter(), 0
                    if config.checkpoint_every and state["step"] % config.checkpoint_every == 0 and state["step"] < total_steps:
                        save()
                    if state["step"] >= total_steps:
                        break
            if state["batch"] >= steps_per_epoch or state["step"] >= total_steps:
                epoch_done = state["batch"] >= steps_per_epoch
                if val_set is not None and config.eval_every and (epoch_done and (epoch + 1) % config.eval_every == 0
                                                                  or state["step"] >= total_steps):
                    metrics = _evaluate(model, val_set, config, device, dist_info, autocast)
                    entry = {"epoch": epoch + 1, "step": state["step"], **metrics}
                    history.append(entry)
                    log.record(entry)
                    log.line(f"epoch {epoch + 1} eval: loss {metrics['loss']:.4f} top-1 {metrics['top1']:.2%} top-5 {metrics['top5']:.2%}")
                if epoch_done:
                    state["epoch"] += 1
                    state["batch"] = 0
    save(final=True)
    if state["skipped"]:
        log.line(f"{state['skipped']} step(s) skipped: non-finite loss or gradient")
    seconds = time.perf_counter() - started
    log.line(f"done: {state['step']} steps in {seconds:.0f} s; wrote {out}")
    if isinstance(wrapper, AG3):
        wrapper.close()
    return FinetuneResult(out, state["step"], history, state["skipped"], seconds)


def _gather(obj: Any, dist_info: _Dist) -> list[Any]:
    if dist_info.world == 1:
        return [obj]
    import torch.distributed as dist

    items: list[Any] = [None] * dist_info.world
    dist.all_gather_object(items, {k: v.cpu() for k, v in obj.items()})
    return items


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int, done: int, name: str, console: Any = None) -> Iterator[Callable[[int, float | None], None]]:
    if not enabled:
        yield lambda step, loss: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]finetune[/] {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=console) as bar:
        task = bar.add_task(name, total=total, completed=done, status="")

        def update(step: int, loss: float | None) -> None:
            bar.update(task, completed=step, **({"status": f"loss {loss:.4f}"} if loss is not None else {}))

        yield update


def _evaluate(model: nn.Module, dataset: Dataset, config: FinetuneConfig, device: torch.device, dist_info: _Dist,
              autocast: Callable[[], contextlib.AbstractContextManager]) -> dict[str, float]:
    """Loss, top-1 and top-5 over ``dataset`` (each rank a strided share, summed across ranks)."""
    was_training = model.training
    model.eval()
    indices = list(range(dist_info.rank, len(dataset), dist_info.world))  # type: ignore[arg-type]
    loader = DataLoader(dataset, batch_size=config.data.eval_batch_size or config.data.batch_size, sampler=indices,
                        num_workers=config.data.num_workers, generator=torch.Generator())
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, count
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast():
                logits = model(x)
            logits = logits.float()
            k = min(5, logits.shape[-1])
            top = logits.topk(k, dim=-1).indices
            totals[0] += F.cross_entropy(logits, y, reduction="sum").double()
            totals[1] += (top[:, 0] == y).sum()
            totals[2] += (top == y[:, None]).any(-1).sum()
            totals[3] += len(y)
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.all_reduce(totals)
    model.train(was_training)
    n = max(float(totals[3]), 1.0)
    return {"loss": float(totals[0]) / n, "top1": float(totals[1]) / n, "top5": float(totals[2]) / n}
