"""The fine-tuning loop: model, optimizer wrapper, scheduler, DDP, evaluation, logging, atomic
checkpoints and exact resume (see :mod:`ttadapt.finetune`)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .. import models as zoo
from ..atomic import check_output_folder, torch_save_atomically, write_bytes_atomically
from ..config import ConfigError, to_dict
from ..data import DataError
from ..models.weights import CHECKPOINT_FORMAT
from ..optim import AG1, AG2, AG3, SAM, create_optimizer
from ..optim.base import all_finite
from .config import FinetuneConfig, ScheduleConfig, validate
from .data import EpochSampler, SeededItems, datasets, labels_of
from .distributed import DistInfo, all_reduce_mean, gather, init_distributed

__all__ = ["finetune", "FinetuneResult", "read_checkpoint", "RUN_FORMAT"]

RUN_FORMAT = "ttadapt-finetune/1"


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


def _clipping(model: nn.Module, bound: float) -> Callable[..., None]:
    """A step pre-hook that clips the gradient to global L2 norm ``bound`` (a pre-hook returns None)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def clip(optimizer: Any, args: Any, kwargs: Any) -> None:
        torch.nn.utils.clip_grad_norm_(params, bound)

    return clip


def _device(config: FinetuneConfig, dist_info: DistInfo) -> torch.device:
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
    validate(config)
    dist_info = init_distributed(config.device)
    try:
        return _run(config, dist_info, resume, echo, progress, on_step)
    finally:
        if dist_info.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(config: FinetuneConfig, dist_info: DistInfo, resume: bool | str | os.PathLike, echo: Callable[[str], None] | None,
         progress: Any, on_step: Callable[[int, float], None] | None) -> FinetuneResult:
    started = time.perf_counter()
    device = _device(config, dist_info)
    out = Path(config.out or f"runs/{config.name}")
    if dist_info.main:
        try:
            check_output_folder(out)
        except OSError as err:
            raise ConfigError(f"out: {err}") from err
    ckpt_path = out / "checkpoint.pt"
    saved: dict[str, Any] | None = None
    if resume:
        saved = read_checkpoint(ckpt_path if resume is True else Path(resume))
        _check_resumable(saved["config"], config, ckpt_path)
    elif ckpt_path.exists():  # a fresh run would overwrite another run's checkpoint
        raise ConfigError(f"{ckpt_path} exists: continue that run with --resume, or choose another out "
                          "(or delete the folder to start over)")
    if config.data.batch_size % dist_info.world:
        raise ConfigError(f"data.batch_size {config.data.batch_size} does not split over {dist_info.world} processes")
    per_rank = config.data.batch_size // dist_info.world

    train_set, val_set = datasets(config)
    sampler = EpochSampler(len(train_set), per_rank, seed=config.seed, rank=dist_info.rank, world=dist_info.world)  # type: ignore[arg-type]
    if sampler.batches_per_epoch == 0:
        raise DataError(f"the training set has {len(train_set)} examples, fewer than one batch of {config.data.batch_size}")  # type: ignore[arg-type]
    torch.manual_seed(config.seed)
    model = zoo.create(config.model.name, num_classes=config.model.num_classes, weights=config.model.weights,
                       download=config.model.download)
    classes = zoo.num_classes_of(config.model.name, model)
    labels = labels_of(train_set)
    if labels and (max(labels) >= classes or min(labels) < 0):
        raise DataError(f"the training labels reach {max(labels)} but {config.model.name} predicts {classes} classes; "
                        "set model.num_classes or data.class_map")
    model.to(device)
    train_items = SeededItems(train_set, config.seed) if config.data.name == "imagefolder" and config.data.augment else train_set

    optimizer = create_optimizer(config.optim.name, model.parameters(), config.optim.lr, **config.optim.options)
    if config.optim.max_grad_norm is not None:  # a step pre-hook: every real step a wrapper makes runs it
        optimizer.register_step_pre_hook(_clipping(model, float(config.optim.max_grad_norm)))
    method = config.method
    wrapper: AG1 | AG2 | AG3 | SAM | None = None
    reduce = all_reduce_mean(dist_info.world) if dist_info.world > 1 else None
    if method.name in ("ag1", "ag2"):
        wrapper = (AG1 if method.name == "ag1" else AG2)(model, optimizer, linear=method.linear, reduce=reduce)
        wrapper.record_loss_after = method.measure_batch_loss
    elif method.name in ("ag3", "ag3_1"):
        wrapper = AG3(model, optimizer, d=1 if method.name == "ag3_1" else method.d, linear=method.linear,
                      anchor_storage=method.anchor_storage, anchor_dir=method.anchor_dir)
    elif method.name == "sam":
        wrapper = SAM(model, optimizer, rho=method.rho, adaptive=method.adaptive, reduce=reduce)
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = steps_per_epoch * config.epochs if config.max_steps is None else min(config.max_steps, steps_per_epoch * config.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config.schedule, total_steps))

    ddp: nn.Module | None = None
    if dist_info.world > 1:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        if method.name in ("sam", "ag1", "ag2"):  # no DDP wrapper: their gradients are all-reduced explicitly
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, 0)
        else:
            ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    net = ddp if ddp is not None else model

    state = {"epoch": 0, "batch": 0, "step": 0, "skipped": 0}
    history: list[dict[str, float]] = []
    measure = method.measure_batch_loss and method.name in ("ag1", "ag2")
    decreases: dict[str, list[float]] = {"ag": [], "plain": []}  # per-step batch-loss decreases (measure_batch_loss)
    if saved is not None:
        model.load_state_dict(saved["model"])
        (wrapper or optimizer).load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state.update(saved["position"])
        history = list(saved.get("history", []))
        decreases = {k: list(v) for k, v in saved.get("decreases", decreases).items()}
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
        rngs = gather(_rng_state(device), dist_info)
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
            "decreases": decreases,
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
        before = wrapper.skipped_steps
        if isinstance(wrapper, AG3):
            loss = wrapper.step(closure_on(net), anchor_closure=closure_on(model))
        else:
            loss = wrapper.step(closure_on(model))
        state["skipped"] += wrapper.skipped_steps - before
        if measure and isinstance(wrapper, (AG1, AG2)) and wrapper.last_loss_after is not None:
            pair = torch.stack([loss - wrapper.last_loss_after, loss - wrapper.last_forecast_loss]).double()
            if reduce is not None:
                reduce([pair])
            decreases["ag"].append(float(pair[0]))
            decreases["plain"].append(float(pair[1]))
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
                if isinstance(train_items, SeededItems):
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
                    if measure:
                        metrics.update(_improvement(decreases))
                    entry = {"epoch": epoch + 1, "step": state["step"], **metrics}
                    history.append(entry)
                    log.record(entry)
                    log.line(f"epoch {epoch + 1} eval: loss {metrics['loss']:.4f} top-1 {metrics['top1']:.2%} top-5 {metrics['top5']:.2%}")
                if epoch_done:
                    state["epoch"] += 1
                    state["batch"] = 0
    save(final=True)
    if measure:
        summary = _improvement(decreases)
        log.line(f"batch-loss improvement over the ordinary update of the same L1 length: "
                 f"{100 * summary['batch_loss_improvement']:+.2f} % over {len(decreases['ag'])} steps")
    if state["skipped"]:
        log.line(f"{state['skipped']} step(s) skipped: non-finite loss or gradient")
    seconds = time.perf_counter() - started
    last = f", last eval top-1 {history[-1]['top1']:.2%}" if history else ""
    log.line(f"done: {state['step']} steps in {seconds:.0f} s{last}; wrote {out}")
    if isinstance(wrapper, AG3):
        wrapper.close()
    return FinetuneResult(out, state["step"], history, state["skipped"], seconds)


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


def _improvement(decreases: dict[str, list[float]]) -> dict[str, float]:
    """The run's batch-loss improvement so far (spec §4; NaN while undefined)."""
    from ..metrics import batch_loss_improvement

    try:
        value = batch_loss_improvement(decreases["ag"], decreases["plain"]).mean if decreases["ag"] else float("nan")
    except ValueError:
        value = float("nan")
    return {"batch_loss_improvement": value, "decrease_ag": sum(decreases["ag"]), "decrease_plain": sum(decreases["plain"])}


def _evaluate(model: nn.Module, dataset: Dataset, config: FinetuneConfig, device: torch.device, dist_info: DistInfo,
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
