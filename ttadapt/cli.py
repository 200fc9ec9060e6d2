"""The ``ttadapt`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="ttadapt",
    help="Parameter-space averaged gradients for PyTorch models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


def _fail(message: str) -> None:
    """One clear line on stderr and exit status 2 — never a traceback."""
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _require(checks: "list[tuple[bool, str, object]]") -> None:
    """Fail, naming every option out of range with its value, if any is: (condition that must
    hold, what it must be, the value given)."""
    problems = [f"{requirement}, got {value}" for ok, requirement, value in checks if not ok]
    if problems:
        _fail("; ".join(problems))


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _version(value: bool) -> None:
    if value:
        from . import __version__

        console.print(f"ttadapt {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
) -> None:
    """Parameter-space averaged gradients for PyTorch models."""


@app.command()
def activations() -> None:
    """List the activations the averaged backward replaces by secant slopes."""
    from .activations import registered_activations, registered_module_activations

    table = Table(title="Averaged activations")
    table.add_column("activation", overflow="fold")
    table.add_column("called as", overflow="fold")
    table.add_column("kinks")
    for name, act in registered_activations().items():
        forms = sorted({_form_name(f.func) for f in act.forms})
        try:
            kinks = ", ".join(f"{k:g}" for k in act.kinks(**act.defaults)) if not act.parametric else "0"
        except TypeError:
            kinks = "?"
        table.add_row(name, ", ".join(forms), kinks or "—")
    for cls, entry in registered_module_activations().items():
        table.add_row(entry.name, f"any {cls.__qualname__} module (one site per call)", "—")
    console.print(table)
    from . import kernels, pooling

    console.print(f"CPU secants: {kernels.status()}", soft_wrap=True)
    console.print("Max pooling in ttadapt's passes: " + (
        "faster code, the same values and gradients (TTADAPT_FAST_POOLING=0 turns it off)" if pooling.ENABLED
        else "PyTorch's own call (TTADAPT_FAST_POOLING=0)"), soft_wrap=True)
    from . import memory

    console.print("Freed CPU memory: " + (
        "kept by glibc for reuse (TTADAPT_KEEP_FREED_MEMORY=0 turns it off)" if memory.kept
        else "the C library's default handling" + ("" if memory.keep_freed_memory_enabled() else " (TTADAPT_KEEP_FREED_MEMORY=0)")),
        soft_wrap=True)


def _form_name(func) -> str:
    from .activations import _func_name

    module = getattr(func, "__module__", None) or ""
    name = _func_name(func)
    if name.startswith("Tensor."):
        return name
    prefix = "F." if module.startswith("torch.nn.functional") or module == "torch._C._nn" else "torch."
    if module == "torch._C._special":
        prefix = "torch.special."
    return prefix + name


@app.command()
def inspect(
    model: Annotated[str, typer.Option("--model", "-m", help="A zoo model (see `ttadapt models`) or any torchvision model name, e.g. resnet18 (random weights).")],
    input_size: Annotated[Optional[tuple[int, int, int]], typer.Option("--input-size", help="Channels, height, width of the example input (default: the model's).")] = None,
    batch: Annotated[int, typer.Option("--batch", help="Example batch size.")] = 2,
    linear: Annotated[bool, typer.Option("--linear", help="Also list the affine layers the Linear variant averages.")] = False,
) -> None:
    """Print which pointwise calls of a model's forward pass are averaged."""
    import torch
    import torchvision

    from . import models as zoo
    from .inspection import inspect as run_inspect

    _require([(batch >= 1, "--batch must be >= 1", batch),
              (input_size is None or min(input_size) >= 1, "--input-size must be positive",
               " ".join(map(str, input_size or ())))])
    if model in zoo.list_models():
        info = zoo.model_info(model)
        net = zoo.create(model)
        if info.input == "tokens":
            x = torch.randint(1, 2000, (batch, 32))
        else:
            x = torch.rand(batch, *(input_size or ((1, 28, 28) if info.input == "mnist" else (3, 224, 224))))
    else:
        names = set(torchvision.models.list_models())
        if model not in names:
            close = sorted(n for n in names | set(zoo.list_models()) if model.lower() in n)[:5]
            _fail(f"unknown model {model!r}" + (f"; did you mean one of: {', '.join(close)}?" if close else
                                                "; see `ttadapt models` or torchvision.models.list_models()"))
        net, example = _torchvision_model(model, input_size)
        x = torch.randn(batch, *example)
    try:
        report = run_inspect(net, x, linear=linear)
    except Exception as err:  # the model's own code refusing the input (detection models assert on targets)
        _fail(f"{model} does not run on input {tuple(x.shape)}: {_first_line(err)}")
    console.print(str(report), highlight=False)


def _torchvision_model(name: str, input_size: "tuple[int, int, int] | None") -> "tuple[object, tuple[int, ...]]":
    """torchvision model ``name`` with random weights — its backbone's too, so that nothing is
    downloaded — and the shape of one example input: ``input_size`` or the crop size its weights'
    transforms name (inception_v3: 299), with 16 frames added for a video model."""
    import inspect as signature_of
    import warnings

    import torchvision

    builder = torchvision.models.get_model_builder(name)
    kwargs = {"weights": None}
    if "weights_backbone" in signature_of.signature(builder).parameters:
        kwargs["weights_backbone"] = None
    with warnings.catch_warnings():  # (inception's note on its future initialisation, say)
        warnings.simplefilter("ignore")
        net = builder(**kwargs)
    size = input_size
    if size is None:
        crop = None
        try:
            crop = getattr(next(iter(torchvision.models.get_model_weights(name))).transforms(), "crop_size", None)
        except (ValueError, StopIteration, TypeError):  # a model without named weights
            pass
        side = crop[0] if crop else 224
        size = (3, side, side)
    video = builder.__module__.startswith("torchvision.models.video")
    return net, ((size[0], 16, *size[1:]) if video else tuple(size))


def _parameter_count(info) -> int:
    """A zoo model's parameter count, built on PyTorch's meta device (shapes without memory or
    initialisation: the four ResNet-152s took seconds each); a model that cannot be built there
    is built for real."""
    import torch

    from . import models as zoo

    try:
        with torch.device("meta"):
            return zoo.count_parameters(info.build(info.num_classes))
    except Exception:  # a registered model whose constructor needs real tensors
        return zoo.count_parameters(info.build(info.num_classes))


@app.command("models")
def list_zoo() -> None:
    """List the model zoo: parameters (ours and the paper's), inputs, named weights."""
    from . import models as zoo

    # a narrow terminal gets the descriptions below the table (in it they wrap a word per line)
    wide = console.width >= 130
    table = Table(title="ttadapt model zoo")
    for col in ("name", "parameters", "paper", "input", "weights") + (("description",) if wide else ()):
        table.add_column(col, no_wrap=col != "description")
    descriptions = []
    for name in zoo.list_models():
        info = zoo.model_info(name)
        count = _parameter_count(info)
        row = [name, f"{count:,}", f"{info.paper_parameters:,}" if info.paper_parameters else "-", info.input,
               ", ".join(w for w in info.weights if w != "imagenet_v1" and w != "imagenet_v2") or "-"]
        table.add_row(*row, *([info.description] if wide else []))
        descriptions.append(f"  {name}: {info.description}")
    console.print(table)
    if not wide:
        console.print("\n".join(descriptions), highlight=False, soft_wrap=True)


@app.command()
def train(
    model: Annotated[str, typer.Option("--model", "-m", help="Zoo model to train (model_a, model_b, model_c).")] = "model_a",
    data: Annotated[str, typer.Option("--data", "-d", help="Dataset: mnist5k (offline), mnist, fashion_mnist, imdb.")] = "mnist5k",
    epochs: Annotated[int, typer.Option(help="Passes over the training split.")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Mini-batch size.")] = 128,
    optimizer: Annotated[str, typer.Option(help="rmsprop, adam, adamw, sgd or soap.")] = "adam",
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed for initialisation and shuffling.")] = 0,
    root: Annotated[Optional[str], typer.Option(help="Local data folder (mnist, fashion_mnist, imdb).")] = None,
    download: Annotated[bool, typer.Option("--download", help="Allow downloading the dataset.")] = False,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Checkpoint path (default: <model>_<data>.pt).")] = None,
) -> None:
    """Train a zoo model and save the checkpoint atomically; prints test loss and accuracy."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from . import models as zoo
    from .atomic import check_writable
    from .data import DataError, check_fits, list_datasets
    from .optim import OPTIMIZERS
    from .training import TrainConfig, train as run_train

    if model not in zoo.list_models():
        _fail(f"unknown model {model!r}; available: {', '.join(zoo.list_models())}")
    if data not in list_datasets() or data == "imagefolder":
        _fail(f"unknown dataset {data!r} for training; available: {', '.join(d for d in list_datasets() if d != 'imagefolder')}")
    if optimizer not in OPTIMIZERS:
        _fail(f"unknown optimizer {optimizer!r}; available: {', '.join(OPTIMIZERS)}")
    _require([(epochs >= 1, "--epochs must be >= 1", epochs), (batch_size >= 1, "--batch-size must be >= 1", batch_size),
              (lr > 0, "--lr must be > 0", lr)])
    if zoo.model_info(model).input == "imagenet":
        _fail(f"`ttadapt train` trains Models A-C on their datasets; fine-tune {model} on an image folder with "
              "`ttadapt finetune` (see recipes/resnet152_imagenet_ood_*.yaml)")
    try:
        check_fits(model, data)
    except DataError as err:
        _fail(_first_line(err))
    try:
        check_writable(out or f"{model}_{data}.pt")
    except OSError as err:
        _fail(f"--out: {_first_line(err)}")
    options: dict = {}
    if data != "mnist5k":
        options = {"root": root, "download": download}
    config = TrainConfig(model=model, data=data, epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,
                         seed=seed, out=out, data_options=options)
    with Progress(TextColumn("[bold]training[/] {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} epochs"),
                  TimeElapsedColumn(), TextColumn("{task.fields[status]}"), console=console, transient=False) as bar:
        task = bar.add_task(f"{model} on {data}", total=epochs, status="")

        def progress(epoch: int, total: int, m: dict) -> None:
            bar.update(task, completed=epoch, status=f"train loss {m['train_loss']:.4f}  test acc {m['test_accuracy']:.2%}")

        try:
            result = run_train(config, progress)
        except (DataError, ValueError, OSError) as err:
            _fail(_first_line(err))
    console.print(f"saved {result.checkpoint}: test loss {result.test_loss:.4f}, test accuracy {result.test_accuracy:.2%} "
                  f"({result.seconds:.0f} s)", highlight=False)


@app.command()
def adapt(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Zoo model (see `ttadapt models`). Without it: the embedded demo (shipped model_b, shifted mnist5k digits).")] = None,
    weights: Annotated[Optional[str], typer.Option(help="imagenet | mnist5k | PATH to a .pt/.pth/.safetensors state dict.")] = None,
    batch: Annotated[Optional[str], typer.Option("--batch", "-b", help="Folder of images, a glob, one image, or a .pt file (tensor or {'x', 'y'}).")] = None,
    labels: Annotated[Optional[str], typer.Option(help="Labels file (.txt, .json or .csv), one class index per input.")] = None,
    method: Annotated[Optional[str], typer.Option(help="none, norm, grad (TENT with entropy), ag1, ag2, ag1_linear, ag2_linear, sam. Demo: several, comma-separated.")] = None,
    steps: Annotated[int, typer.Option(help="Adaptation steps on the batch.")] = 10,
    lr: Annotated[float, typer.Option(help="Learning rate of the base optimizer.")] = 1e-4,
    optimizer: Annotated[str, typer.Option(help="rmsprop, adam, adamw, sgd or soap.")] = "rmsprop",
    loss: Annotated[str, typer.Option(help="entropy, filtered_entropy, or ce (needs --labels).")] = "entropy",
    params: Annotated[str, typer.Option(help="Parameters to adapt: norm, all, or comma-separated name patterns.")] = "norm",
    save: Annotated[Optional[str], typer.Option(help="Write the adapted weights (.safetensors or .pt).")] = None,
    output: Annotated[Optional[str], typer.Option(help="Write the predictions (.json or .csv).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Predictions shown per input.")] = 5,
    download: Annotated[bool, typer.Option("--download", help="Allow downloading ImageNet weights.")] = False,
    shift: Annotated[str, typer.Option(help="Demo: the distribution shift.")] = "brightness",
    severity: Annotated[int, typer.Option(help="Demo: shift severity 1-5.")] = 3,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Demo: number of test digits.")] = 128,
    seed: Annotated[int, typer.Option(help="Demo: seed of the digit sample and the shift.")] = 0,
) -> None:
    """Adapt a model to a batch at test time and show the predictions.

    With no options, runs the embedded demo: the shipped model_b checkpoint
    on 128 brightness-shifted mnist5k test digits, comparing the source model,
    TENT-style gradient steps and AG-1/AG-2 at the same steps and learning
    rate."""
    from . import models as zoo
    from .adapt import LOSSES, METHODS
    from .atomic import check_writable
    from .batches import BatchError
    from .cli_adapt import run_custom, run_default
    from .data import DataError
    from .models import WeightsError
    from .optim import OPTIMIZERS

    methods = tuple(m.strip() for m in (method or "").split(",") if m.strip())
    for m in methods:
        if m not in METHODS:
            _fail(f"unknown method {m!r}; choose from: {', '.join(METHODS)}")
    if loss not in LOSSES:
        _fail(f"unknown loss {loss!r}; choose from: {', '.join(LOSSES)}")
    if optimizer not in OPTIMIZERS:
        _fail(f"unknown optimizer {optimizer!r}; choose from: {', '.join(OPTIMIZERS)}")
    _require([(steps >= 0, "--steps must be >= 0", steps), (lr > 0, "--lr must be > 0", lr),
              (top_k >= 1, "--top-k must be >= 1", top_k)])
    for flag, path, kinds in (("--save", save, (".safetensors", ".pt", ".pth")), ("--output", output, (".json", ".csv"))):
        if path is not None and Path(path).suffix.lower() not in kinds:
            _fail(f"{path}: use one of {', '.join(kinds)}")
        if path is not None:
            try:
                check_writable(path)
            except OSError as err:
                _fail(f"{flag}: {_first_line(err)}")
    try:
        if model is None:
            if any(option is not None for option in (batch, weights, labels, save, output)):
                _fail("--batch, --weights, --labels, --save and --output need --model (without --model the embedded demo runs)")
            from .data.shifts import SHIFTS

            if shift not in SHIFTS:
                _fail(f"unknown shift {shift!r}; choose from: {', '.join(SHIFTS)}")
            _require([(1 <= severity <= 5, "--severity must be 1-5", severity),
                      (1 <= batch_size <= 1000, "--batch-size must be 1-1000", batch_size)])
            if loss == "ce":
                _fail("the demo adapts without labels; use --loss entropy or filtered_entropy")
            table = run_default(console, methods or ("none", "grad", "ag1", "ag2"), steps, lr, optimizer, loss, shift,
                                severity, batch_size, seed)
            console.print(table)
            return
        if model not in zoo.list_models():
            _fail(f"unknown model {model!r}; available: {', '.join(zoo.list_models())}")
        if batch is None:
            _fail("--batch is required with --model (a folder of images, a glob, an image or a .pt file)")
        if len(methods) > 1:
            _fail("give one --method with --model")
        chosen_params = params if params in ("norm", "all") else [p.strip() for p in params.split(",") if p.strip()]
        run_custom(console, model_name=model, weights=weights, batch=batch, labels=labels, method=methods[0] if methods else "ag2",
                   steps=steps, lr=lr, optimizer=optimizer, loss=loss, params=chosen_params, save=save, output=output,
                   top_k=top_k, download=download)
    except typer.Exit:
        raise
    except (BatchError, DataError, WeightsError, ValueError) as err:
        _fail(_first_line(err))
    except RuntimeError as err:
        _fail(f"the model does not run on this batch: {_first_line(err)}")


@app.command()
def bench(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML (see recipes/).")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value overrides, e.g. epochs=3 'methods=[grad, ag1]'.")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Output folder (default: bench-<recipe name>).")] = None,
    seeds: Annotated[Optional[int], typer.Option(help="Number of seeds (overrides the recipe).")] = None,
) -> None:
    """Run an experiment recipe: resumable runs, per-run JSON, a Markdown table and PNG curves."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .atomic import check_output_folder
    from .bench import RecipeError, load_recipe, run_recipe
    from .data import DataError
    from .models import WeightsError

    try:
        items = list(overrides or [])
        if seeds is not None:
            items.append(f"seeds={seeds}")
        spec = load_recipe(recipe, items)
        lrs = [len(c["lr"]) if isinstance(c["lr"], list) else 1 for c in spec.optimizers.values()]
        total = sum(lrs) * len(spec.methods) * spec.seeds
        target = out or f"bench-{spec.name}"
        check_output_folder(target)
        with Progress(TextColumn("[bold]bench[/] {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} runs"),
                      TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task(spec.name, total=total)

            def progress(name: str, skipped: bool) -> None:
                bar.update(task, advance=1, description=f"{spec.name}: {name}{' (done before)' if skipped else ''}")

            result = run_recipe(spec, target, progress)
    except typer.Exit:
        raise
    except (RecipeError, DataError, WeightsError, ValueError, OSError) as err:
        _fail(_first_line(err))
    console.print(result["table"], highlight=False, soft_wrap=True)  # Markdown: lines kept whole
    console.print(f"wrote {target}/table.md, {target}/runs/*.json, {target}/curves_*.png", highlight=False)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def finetune(
    ctx: typer.Context,
    recipe: Annotated[Optional[str], typer.Argument(help="Recipe YAML (see recipes/resnet152_imagenet_ood_ag3.yaml).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from <out>/checkpoint.pt.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or log lines on the terminal.")] = False,
) -> None:
    """Fine-tune a zoo model: plain, AG-1, AG-2, AG-3, AG-3-1 or SAM around SOAP/Adam/RMSprop/SGD.

    Overrides follow the recipe as dotted keys: `optim.lr=1e-3 method.name=sam`
    or `--epochs 3`. Run on several processes with
    `torchrun --nproc_per_node N -m ttadapt finetune ...`. Writes config.yaml,
    log.txt, metrics.jsonl, checkpoint.pt and model.pt into `out`."""
    from .config import ConfigError
    from .data import DataError
    from .finetune import finetune as run_finetune
    from .finetune import load_finetune_config
    from .models import WeightsError

    rank = int(__import__("os").environ.get("RANK", "0"))
    overrides = list(ctx.args)
    if recipe is not None and "=" in recipe and not Path(recipe).exists():  # no recipe: overrides only
        recipe, overrides = None, [recipe, *overrides]
    try:
        config = load_finetune_config(recipe, overrides)
    except ConfigError as err:
        _fail(_first_line(err))
    echo = None if quiet or rank != 0 else (lambda line: console.print(line, highlight=False, soft_wrap=True))
    try:
        run_finetune(config, resume=resume, echo=echo, progress=False if quiet else console)  # its last log line sums up
    except (ConfigError, DataError, WeightsError) as err:
        _fail(_first_line(err))
    except (RuntimeError, OSError) as err:  # e.g. images the model cannot take, a full disk
        _fail(f"fine-tuning stopped: {_first_line(err)} (the last checkpoint, if any, is intact: --resume continues from it)")
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted; continue from the last checkpoint with --resume", highlight=False)
        raise typer.Exit(code=130)


def main() -> None:
    from .memory import keep_freed_memory, keep_freed_memory_enabled

    if keep_freed_memory_enabled():  # (no page faults for blocks freed and asked for again: see memory.py)
        keep_freed_memory()
    app()


if __name__ == "__main__":
    main()
