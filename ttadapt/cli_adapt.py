"""``ttadapt adapt``: test-time adaptation from the command line."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .adapt import Adapter, entropy, select_parameters

__all__ = ["run_default", "run_custom", "DEFAULT"]


@dataclass(frozen=True)
class DefaultDemo:
    """The embedded default: the shipped Model B on brightness-shifted mnist5k test digits."""

    model: str = "model_b"
    shift: str = "brightness"
    severity: int = 3
    batch_size: int = 128
    methods: tuple[str, ...] = ("none", "grad", "ag1", "ag2")
    optimizer: str = "rmsprop"
    lr: float = 1e-4
    steps: int = 10
    loss: str = "entropy"
    params: str = "all"


DEFAULT = DefaultDemo()


def _adapt_steps(adapter: Adapter, x, y, steps: int, progress: Progress | None, label: str) -> tuple[float, float]:
    """Run ``steps`` single steps (the adapter is non-episodic); returns (seconds per step, first loss)."""
    task = progress.add_task(label, total=steps) if progress is not None else None
    start = time.perf_counter()
    with warnings.catch_warnings():
        # the adapter's warnings (a rolled-back batch, a batch of one) are shown in the table
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(steps):
            adapter(x, y)
            if progress is not None:
                progress.advance(task)
    seconds = (time.perf_counter() - start) / max(steps, 1)
    return seconds, adapter.rolled_back


def _make_adapter(model, method, optimizer, lr, loss, params):
    if method not in ("none", "norm") and not select_parameters(model, params):  # (in the command line's words)
        given = params if isinstance(params, str) else ",".join(params)
        hint = " (the model has no normalisation layers: use --params all or name patterns)" if params == "norm" else ""
        raise ValueError(f"--params {given} selects no parameters of the model{hint}")
    return Adapter(model, method=method, optimizer=optimizer, lr=lr, steps=1, loss=loss, params=params,
                   episodic=False, predict="before")


def run_default(console: Console, methods: tuple[str, ...], steps: int, lr: float, optimizer: str, loss: str,
                shift: str, severity: int, batch_size: int, seed: int) -> Table:
    from . import data, models

    x, y = data.load("mnist5k", "test").tensors
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=g)[:batch_size]
    xb = data.shifts.apply(x[idx], shift, severity, seed=seed)
    yb = y[idx]
    table = Table(title=f"{DEFAULT.model} (shipped mnist5k weights) on {len(idx)} mnist5k test digits, {shift} severity {severity}; "
                        f"{optimizer} lr {lr:g}, {steps} steps, loss {loss}, all parameters")
    for col in ("method", "entropy before", "entropy after", "accuracy before", "accuracy after", "time / step"):
        table.add_column(col, justify="right" if col != "method" else "left")
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        for method in methods:
            model = models.create(DEFAULT.model, weights="mnist5k")
            with torch.no_grad():
                before = model.eval()(xb)
            adapter = _make_adapter(model, method, optimizer, lr, "ce" if loss == "ce" else loss, DEFAULT.params if method not in ("none", "norm") else "norm")
            n = steps if method not in ("none", "norm") else 0
            seconds, rolled = _adapt_steps(adapter, xb, yb if loss == "ce" else None, n, progress, method)
            with torch.no_grad():
                after = adapter.predict_only(xb)
            acc_b = float((before.argmax(1) == yb).float().mean())
            acc_a = float((after.argmax(1) == yb).float().mean())
            note = f" ({rolled} rolled back)" if rolled else ""
            table.add_row(method + note, f"{float(entropy(before).mean()):.4f}", f"{float(entropy(after).mean()):.4f}",
                          f"{acc_b:.2%}", f"{acc_a:.2%}", f"{seconds * 1e3:.0f} ms" if n else "-")
    return table


def run_custom(console: Console, *, model_name: str, weights: Optional[str], batch: str, labels: Optional[str], method: str,
               steps: int, lr: float, optimizer: str, loss: str, params: str, save: Optional[str], output: Optional[str],
               top_k: int, download: bool) -> None:
    from . import models
    from .adapt import logits_of
    from .batches import input_range_note, read_batch, read_labels, serialize_state, write_atomically

    info = models.model_info(model_name)
    model = models.create(model_name, weights=weights, download=download)
    b = read_batch(batch, info.input)
    if batch.endswith((".pt", ".pth")):  # image files get the model's own preprocessing
        note = input_range_note(b.x, info.input)
        if note:
            Console(stderr=True).print(f"[bold yellow]warning:[/] {note}", highlight=False, soft_wrap=True)
    num_classes = models.num_classes_of(model_name, model)
    y = b.labels
    if labels is not None:
        y = read_labels(labels, b.names, num_classes)
    elif y is not None and len(y) != len(b.x):
        from .batches import BatchError

        raise BatchError(f"the batch file has {len(y)} labels for {len(b.x)} inputs")
    if loss == "ce" and y is None:
        from .batches import BatchError

        raise BatchError("--loss ce adapts with labels: give --labels FILE")
    adapter = _make_adapter(model, method, optimizer, lr, loss, params)
    with torch.no_grad():
        before = logits_of(model(b.x))
    n = steps if method not in ("none", "norm") else 0
    with Progress(TextColumn("adapting"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        seconds, rolled = _adapt_steps(adapter, b.x, y if loss == "ce" else None, n, progress, "adapt")
    with torch.no_grad():
        after = adapter.predict_only(b.x)
    categories = _categories(num_classes, info.input)
    k = max(1, min(top_k, num_classes))
    table = Table(title=f"{model_name}{' (random weights: no --weights given)' if weights is None else ''}: "
                        f"{len(b.names)} inputs, method {method}, {n} steps"
                        + (f", {seconds * 1e3:.0f} ms/step" if n else "") + (f", {rolled} rolled back" if rolled else "")
                        + (", BatchNorm on its running statistics (one input)"
                           if len(b.x) == 1 and adapter._test_statistics_layers() else ""))
    table.add_column("input")
    table.add_column(f"top-{k} after adaptation")
    if y is not None:
        table.add_column("label")
    probs = after.softmax(-1)
    top_p, top_i = probs.topk(k, dim=-1)
    records = []
    for i, name in enumerate(b.names):
        entries = [(int(c), categories[int(c)] if categories else str(int(c)), float(p)) for p, c in zip(top_p[i], top_i[i])]
        records.append({"input": name, "top": [{"class": c, "name": nm, "probability": p} for c, nm, p in entries],
                        **({"label": int(y[i])} if y is not None else {})})
        row = [name, ", ".join(f"{nm} {p:.1%}" for _, nm, p in entries)]
        if y is not None:
            row.append(categories[int(y[i])] if categories else str(int(y[i])))
        table.add_row(*row)
    console.print(table)
    summary = f"entropy {float(entropy(before).mean()):.4f} → {float(entropy(after).mean()):.4f}"
    if y is not None:
        summary += (f"; accuracy {float((before.argmax(1) == y).float().mean()):.2%} → "
                    f"{float((after.argmax(1) == y).float().mean()):.2%}")
    console.print(summary, highlight=False)
    if output:
        write_atomically(output, _format_predictions(records, Path(output).suffix.lower()))
        console.print(f"wrote {output}", highlight=False)
    if save:
        suffix = Path(save).suffix.lower()
        write_atomically(save, serialize_state({k: v.detach().cpu() for k, v in adapter.model.state_dict().items()}, suffix))
        console.print(f"saved the adapted weights to {save}", highlight=False)


def _format_predictions(records: list[dict], suffix: str) -> bytes:
    if suffix == ".json":
        return (json.dumps(records, indent=2) + "\n").encode()
    lines = ["input,rank,class,name,probability" + (",label" if records and "label" in records[0] else "")]
    for r in records:
        for rank, t in enumerate(r["top"], 1):
            name = '"' + t["name"].replace('"', '""') + '"'
            lines.append(f"{json.dumps(r['input'])},{rank},{t['class']},{name},{t['probability']:.6f}"
                         + (f",{r['label']}" if "label" in r else ""))
    return ("\n".join(lines) + "\n").encode()


def _categories(num_classes: int, kind: str) -> list[str] | None:
    if kind == "imagenet" and num_classes == 1000:
        from torchvision.models import ResNet152_Weights

        return list(ResNet152_Weights.IMAGENET1K_V2.meta["categories"])
    return None


