"""``ttadapt bench``: run an experiment recipe (spec §4–5) — training runs over optimizers ×
methods × learning rates × seeds, resumable — and write the resolved recipe, one JSON per run,
a Markdown table in the layout of the paper's Tables 2–4 and PNG plots of the curves."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import metrics
from .atomic import write_bytes_atomically
from .config import ConfigError, check_ranges, load_config
from .data import DataError, check_fits, list_datasets
from .data import load as load_data
from .models import create as create_model
from .models import list_models
from .optim import AG1, AG2, AG3, SAM, create_optimizer
from .optim.factory import check_optimizer
from .training import evaluate

__all__ = ["Recipe", "RecipeError", "load_recipe", "run_recipe", "METHODS"]

METHODS = ("grad", "ag1", "ag2", "ag1_linear", "ag2_linear", "ag3", "ag3_1", "sam")


class RecipeError(ConfigError):
    """A recipe that cannot be run (unknown keys or values), naming what is valid."""


@dataclass
class Recipe:
    """An experiment: every (optimizer, method, learning rate, seed) combination is one run."""

    name: str = "experiment"
    model: str = "model_b"
    data: str = "mnist5k"
    data_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 128
    epochs: int = 10
    seeds: int = 3
    optimizers: dict[str, dict[str, Any]] = field(default_factory=lambda: {"rmsprop": {"lr": 1e-3}})
    methods: list[str] = field(default_factory=lambda: ["grad", "ag1", "ag2"])
    ag3_d: int = 45
    sam_rho: float = 0.05
    objective: Literal["final_train_loss", "final_test_loss", "final_test_accuracy"] = "final_train_loss"  # resolves a learning-rate grid
    max_steps_per_epoch: int | None = None  # to make quick recipes


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe and apply ``key=value`` overrides (values parsed as YAML)."""
    try:
        recipe = load_config(Recipe, path, overrides, what="recipe")
    except ConfigError as exc:
        raise RecipeError(str(exc)) from exc
    bad = [m for m in recipe.methods if m not in METHODS]
    if bad:
        raise RecipeError(f"unknown method(s) {', '.join(bad)}; valid: {', '.join(METHODS)}")
    if recipe.model not in list_models():
        raise RecipeError(f"model: unknown model {recipe.model!r}; available: {', '.join(list_models())}")
    if recipe.data not in list_datasets():
        raise RecipeError(f"data: unknown dataset {recipe.data!r}; available: {', '.join(list_datasets())}")
    try:
        check_fits(recipe.model, recipe.data)
    except DataError as err:
        raise RecipeError(f"model and data: {err}") from err
    try:
        check_ranges([
            ("epochs", recipe.epochs, recipe.epochs >= 1, "must be >= 1"),
            ("seeds", recipe.seeds, recipe.seeds >= 1, "must be >= 1"),
            ("batch_size", recipe.batch_size, recipe.batch_size >= 1, "must be >= 1"),
            ("ag3_d", recipe.ag3_d, recipe.ag3_d >= 1, "must be >= 1"),
            ("sam_rho", recipe.sam_rho, recipe.sam_rho >= 0, "must be >= 0"),
            ("max_steps_per_epoch", recipe.max_steps_per_epoch,
             recipe.max_steps_per_epoch is None or recipe.max_steps_per_epoch >= 1, "must be >= 1 (or null)"),
        ])
    except ConfigError as err:
        raise RecipeError(str(err)) from err
    if not recipe.optimizers:
        raise RecipeError("optimizers: name at least one, e.g. {rmsprop: {lr: 1.0e-3}}")
    for opt, cfg in recipe.optimizers.items():
        if not isinstance(cfg, dict) or "lr" not in cfg:
            raise RecipeError(f"optimizer {opt!r} needs an lr (a number or a list to search)")
        lrs = cfg["lr"] if isinstance(cfg["lr"], list) else [cfg["lr"]]
        try:
            lrs = [float(lr) for lr in lrs]
        except (TypeError, ValueError):
            lrs = []
        if not lrs or min(lrs) <= 0:
            raise RecipeError(f"optimizers.{opt}.lr must be a number > 0 or a non-empty list of them, got {cfg['lr']!r}")
        extra = {k: v for k, v in cfg.items() if k != "lr"}
        try:
            check_optimizer(opt, lrs[0], extra)
        except ValueError as err:
            raise RecipeError(f"optimizers.{opt}{' options ' + repr(extra) if extra else ''}: {err}") from err
    return recipe


def _wrap(method: str, model, opt, recipe: Recipe):
    if method == "grad":
        return None
    if method.startswith(("ag1", "ag2")):
        wrapper = (AG1 if method.startswith("ag1") else AG2)(model, opt, linear=method.endswith("linear"))
        wrapper.record_lengths = wrapper.record_loss_after = True  # the table's step lengths and loss decreases
        return wrapper
    if method == "ag3":
        return AG3(model, opt, d=recipe.ag3_d)
    if method == "ag3_1":
        return AG3(model, opt, d=1)
    return SAM(model, opt, rho=recipe.sam_rho)


def run_one(recipe: Recipe, optimizer: str, method: str, lr: float, seed: int) -> dict[str, Any]:
    """One training run; returns its record (per-epoch curves, per-step loss decreases)."""
    train_set = load_data(recipe.data, "train", **recipe.data_options)
    test_set = load_data(recipe.data, "test", **recipe.data_options)
    torch.manual_seed(seed)
    model = create_model(recipe.model)
    extra = {k: v for k, v in recipe.optimizers[optimizer].items() if k != "lr"}
    opt = create_optimizer(optimizer, model.parameters(), lr, **extra)
    wrapper = _wrap(method, model, opt, recipe)
    loader = DataLoader(train_set, batch_size=recipe.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    record: dict[str, Any] = {"optimizer": optimizer, "method": method, "lr": lr, "seed": seed,
                              "train_loss": [], "test_loss": [], "test_accuracy": [], "decrease_ag": [], "decrease_plain": [],
                              "l1_ag": [], "l2_ag": [], "l1_plain": [], "l2_plain": []}
    start = time.perf_counter()
    for _ in range(recipe.epochs):
        model.train()
        total, seen = 0.0, 0
        for i, (x, y) in enumerate(loader):
            if recipe.max_steps_per_epoch is not None and i >= recipe.max_steps_per_epoch:
                break
            closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
            if wrapper is None:
                opt.zero_grad(set_to_none=True)
                loss = closure()
                loss.backward()
                opt.step()
                loss = loss.detach()
            else:
                loss = wrapper.step(closure)
                if isinstance(wrapper, (AG1, AG2)) and wrapper.last_loss_after is not None:
                    record["decrease_ag"].append(float(loss) - float(wrapper.last_loss_after))
                    record["decrease_plain"].append(float(loss) - float(wrapper.last_forecast_loss))
                    if wrapper.last_lengths is not None:
                        l1_plain, l2_plain, l1_ag, l2_ag = wrapper.last_lengths
                        for key, value in (("l1_ag", l1_ag), ("l2_ag", l2_ag), ("l1_plain", l1_plain), ("l2_plain", l2_plain)):
                            record[key].append(value)
            total += float(loss) * len(y)
            seen += len(y)
        test_loss, test_acc = evaluate(model, test_set)
        record["train_loss"].append(total / max(seen, 1))
        record["test_loss"].append(test_loss)
        record["test_accuracy"].append(test_acc)
    record["seconds"] = time.perf_counter() - start
    return record


def _run_path(out: Path, optimizer: str, method: str, lr: float, seed: int) -> Path:
    return out / "runs" / f"{optimizer}-{method}-lr{lr:g}-seed{seed}.json"


def run_recipe(recipe: Recipe, out: str | Path, progress: Callable[[str, bool], None] | None = None) -> dict[str, Any]:
    """Run every missing run of ``recipe`` into ``out`` and write the report; finished runs
    (their JSON exists) are read back, not redone. ``progress(run name, skipped)`` is called per run."""
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(out / "recipe.json", (json.dumps(dataclasses.asdict(recipe), indent=2) + "\n").encode())
    runs: dict[tuple, list[dict]] = {}
    for optimizer, cfg in recipe.optimizers.items():
        lrs = cfg["lr"] if isinstance(cfg["lr"], list) else [cfg["lr"]]
        for method in recipe.methods:
            for lr in lrs:
                for seed in range(recipe.seeds):
                    path = _run_path(out, optimizer, method, float(lr), seed)
                    skipped = path.is_file()
                    if skipped:
                        rec = json.loads(path.read_text())
                    else:
                        rec = run_one(recipe, optimizer, method, float(lr), seed)
                        write_bytes_atomically(path, (json.dumps(rec) + "\n").encode())
                    runs.setdefault((optimizer, method, float(lr)), []).append(rec)
                    if progress is not None:
                        progress(path.stem, skipped)
    best = _best_lrs(recipe, runs)
    report = _report(recipe, runs, best)
    write_bytes_atomically(out / "table.md", report.encode())
    _plots(recipe, runs, best, out)
    return {"best_lr": best, "table": report}


def _objective(recipe: Recipe, recs: list[dict]) -> float:
    key = {"final_train_loss": "train_loss", "final_test_loss": "test_loss", "final_test_accuracy": "test_accuracy"}.get(recipe.objective)
    if key is None:
        raise RecipeError(f"unknown objective {recipe.objective!r}; valid: final_train_loss, final_test_loss, final_test_accuracy")
    value = statistics.fmean(r[key][-1] for r in recs)
    return -value if key == "test_accuracy" else value


def _best_lrs(recipe: Recipe, runs: dict) -> dict[tuple[str, str], float]:
    best: dict[tuple[str, str], float] = {}
    for (opt, method, lr), recs in runs.items():
        score = _objective(recipe, recs)
        if not math.isfinite(score):
            continue
        key = (opt, method)
        if key not in best or score < _objective(recipe, runs[(opt, method, best[key])]):
            best[key] = lr
    return best


def _report(recipe: Recipe, runs: dict, best: dict) -> str:
    lines = [f"# {recipe.name}", "", f"{recipe.model} on {recipe.data}, batch {recipe.batch_size}, {recipe.epochs} epochs, "
             f"{recipe.seeds} seed{'s' if recipe.seeds != 1 else ' (no standard errors)'}; learning rate per row chosen by {recipe.objective}. Sample efficiency is on the "
             "training-loss curves against the same optimizer's gradient row (1.00 = equal); batch-loss improvement at "
             "matched L1 length (AG-1/AG-2 only).", "",
             "| optimizer | method | lr | test accuracy | final test loss | final train loss | sample efficiency | batch-loss improvement | "
             "relative avg. step length L1 / L2 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (opt, method), lr in best.items():
        recs = runs[(opt, method, lr)]
        acc = metrics.mean_sem([r["test_accuracy"][-1] * 100 for r in recs])
        test_loss = metrics.mean_sem([r["test_loss"][-1] for r in recs])
        train_loss = metrics.mean_sem([r["train_loss"][-1] for r in recs])
        eff = "-"
        if (opt, "grad") in best and method != "grad":
            base = runs[(opt, "grad", best[(opt, "grad")])]
            eff = f"{metrics.sample_efficiency([r['train_loss'] for r in recs], [r['train_loss'] for r in base]):.2f}"
        imp = "-"
        if recs[0]["decrease_ag"]:
            try:
                m = metrics.batch_loss_improvement([r["decrease_ag"] for r in recs], [r["decrease_plain"] for r in recs])
                imp = f"({100 * m.mean:.1f} ± {100 * m.sem:.1f}) %" if len(recs) > 1 else f"{100 * m.mean:.1f} %"
            except ValueError:
                imp = "undefined"
        if len(recs) == 1:  # one seed: no standard error to show (a "± 0" would claim one)
            cells = f"{acc.mean:.2f} % | {test_loss.mean:.4g} | {train_loss.mean:.4g}"
        else:
            cells = f"{acc.mean:.2f} ± {acc.sem:.2f} % | {test_loss} | {train_loss}"
        lines.append(f"| {opt} | {method} | {lr:g} | {cells} | {eff} | {imp} | {_relative_lengths(recs)} |")
    return "\n".join(lines) + "\n"


def _relative_lengths(recs: list[dict]) -> str:
    """Average AG step length over the average ordinary (forecast) step length, L1 and L2, mean
    over runs (the paper's last column); "-" for runs that did not record lengths."""
    if not all(r.get("l1_plain") for r in recs):
        return "-"
    l1 = statistics.fmean(sum(r["l1_ag"]) / sum(r["l1_plain"]) for r in recs)
    l2 = statistics.fmean(sum(r["l2_ag"]) / sum(r["l2_plain"]) for r in recs)
    return f"{100 * l1:.1f} % / {100 * l2:.1f} %"


def _plots(recipe: Recipe, runs: dict, best: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for opt in recipe.optimizers:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for (o, method), lr in best.items():
            if o != opt:
                continue
            recs = runs[(o, method, lr)]
            for ax, key in zip(axes, ("train_loss", "test_loss", "test_accuracy")):
                curves = torch.tensor([r[key] for r in recs], dtype=torch.float64)
                mean = curves.mean(0)
                sem = curves.std(0, unbiased=True) / math.sqrt(len(recs)) if len(recs) > 1 else torch.zeros_like(mean)
                epochs = range(1, len(mean) + 1)
                ax.plot(epochs, mean, label=f"{method} (lr {lr:g})")
                ax.fill_between(epochs, mean - sem, mean + sem, alpha=0.2)
                ax.set_title(key.replace("_", " "))
                ax.set_xlabel("epoch")
        axes[0].legend()
        fig.suptitle(f"{recipe.name}: {opt}")
        fig.tight_layout()
        import io

        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        write_bytes_atomically(out / f"curves_{opt}.png", buffer.getvalue())
