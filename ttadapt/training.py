"""Training a zoo model on a dataset and saving the checkpoint atomically (``ttadapt train``)."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import models as zoo
from .atomic import torch_save_atomically
from .data import check_fits
from .data import load as load_data
from .models.weights import CHECKPOINT_FORMAT
from .optim import create_optimizer

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "save_checkpoint"]


@dataclass
class TrainConfig:
    """What ``ttadapt train`` does: ``epochs`` passes of ``optimizer`` over the training split."""

    model: str = "model_a"
    data: str = "mnist5k"
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    seed: int = 0
    out: str | None = None  # checkpoint path; default <model>_<data>.pt in the working directory
    data_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    checkpoint: Path
    test_loss: float
    test_accuracy: float
    train_loss: float
    seconds: float
    history: list[dict[str, float]]


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 500) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (eval mode) on ``dataset``."""
    was_training = model.training
    model.eval()
    total, loss_sum, correct = 0, 0.0, 0
    with torch.no_grad():
        for x, y in DataLoader(dataset, batch_size=batch_size):
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
            total += len(y)
    model.train(was_training)
    return loss_sum / max(total, 1), correct / max(total, 1)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, model_name: str, meta: dict[str, Any]) -> Path:
    """Write ``{format, model, state_dict, ...meta}`` with ``torch.save`` to a temporary file in
    the target directory, then rename it into place: a crash never leaves half a checkpoint."""
    payload = {"format": CHECKPOINT_FORMAT, "model": model_name, "state_dict": model.state_dict(), **meta}
    return torch_save_atomically(payload, path)


def train(config: TrainConfig, progress: Callable[[int, int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train ``config.model`` on ``config.data`` and save the checkpoint; ``progress(epoch,
    epochs, metrics)`` is called after every epoch."""
    if config.epochs < 1 or config.batch_size < 1 or config.lr <= 0:
        raise ValueError("epochs and batch_size must be >= 1 and lr > 0")
    check_fits(config.model, config.data)  # an unknown name or a misfit fails before any data is read
    train_set = load_data(config.data, "train", **config.data_options)
    test_set = load_data(config.data, "test", **config.data_options)
    torch.manual_seed(config.seed)
    model = zoo.create(config.model)
    optimizer = create_optimizer(config.optimizer, model.parameters(), config.lr)
    loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(config.seed))
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        model.train()
        seen, loss_sum = 0, 0.0
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(y)
            seen += len(y)
        test_loss, test_acc = evaluate(model, test_set)
        metrics = {"epoch": epoch, "train_loss": loss_sum / seen, "test_loss": test_loss, "test_accuracy": test_acc}
        history.append(metrics)
        if progress is not None:
            progress(epoch, config.epochs, metrics)
    seconds = time.perf_counter() - start
    out = Path(config.out) if config.out else Path(f"{config.model}_{config.data}.pt")
    meta = {
        "data": config.data,
        "num_classes": zoo.num_classes_of(config.model, model),
        "config": {k: v for k, v in asdict(config).items() if k != "out"},
        "test_loss": history[-1]["test_loss"],
        "test_accuracy": history[-1]["test_accuracy"],
        "history": history,
        "torch": str(torch.__version__),
    }
    path = save_checkpoint(out, model, config.model, meta)
    return TrainResult(path, history[-1]["test_loss"], history[-1]["test_accuracy"], history[-1]["train_loss"], seconds, history)
