"""The ``ttadapt`` command line."""

from __future__ import annotations

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
    table.add_column("activation")
    table.add_column("called as")
    table.add_column("kinks")
    for name, act in registered_activations().items():
        forms = sorted({_form_name(f.func) for f in act.forms})
        try:
            kinks = ", ".join(f"{k:g}" for k in act.kinks(**act.defaults)) if not act.parametric else "0"
        except TypeError:
            kinks = "?"
        table.add_row(name, ", ".join(forms), kinks or "—")
    for cls, entry in registered_module_activations().items():
        table.add_row(entry.name, f"{cls.__module__}.{cls.__qualname__} (whole module call)", "—")
    console.print(table)


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

    if batch < 1 or (input_size is not None and min(input_size) < 1):
        _fail("--batch and --input-size must be positive")
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
        net = torchvision.models.get_model(model, weights=None)
        x = torch.randn(batch, *(input_size or (3, 224, 224)))
    try:
        report = run_inspect(net, x, linear=linear)
    except (RuntimeError, ValueError, TypeError) as err:
        _fail(f"{model} does not run on input {tuple(x.shape)}: {str(err).splitlines()[0]}")
    console.print(str(report), highlight=False)


@app.command("models")
def list_zoo() -> None:
    """List the model zoo: parameters (ours and the paper's), inputs, named weights."""
    from . import models as zoo

    table = Table(title="ttadapt model zoo")
    for col in ("name", "parameters", "paper", "input", "weights", "description"):
        table.add_column(col, no_wrap=col != "description")
    for name in zoo.list_models():
        info = zoo.model_info(name)
        count = zoo.count_parameters(info.build(info.num_classes))
        table.add_row(name, f"{count:,}", f"{info.paper_parameters:,}" if info.paper_parameters else "-", info.input,
                      ", ".join(w for w in info.weights if w != "imagenet_v1" and w != "imagenet_v2") or "-", info.description)
    console.print(table)


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
    from .data import DataError, list_datasets
    from .optim import OPTIMIZERS
    from .training import TrainConfig, train as run_train

    if model not in zoo.list_models():
        _fail(f"unknown model {model!r}; available: {', '.join(zoo.list_models())}")
    if data not in list_datasets() or data == "imagefolder":
        _fail(f"unknown dataset {data!r} for training; available: {', '.join(d for d in list_datasets() if d != 'imagefolder')}")
    if optimizer not in OPTIMIZERS:
        _fail(f"unknown optimizer {optimizer!r}; available: {', '.join(OPTIMIZERS)}")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        _fail("--epochs and --batch-size must be >= 1 and --lr > 0")
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
            _fail(str(err).splitlines()[0])
    console.print(f"saved {result.checkpoint}: test loss {result.test_loss:.4f}, test accuracy {result.test_accuracy:.2%} "
                  f"({result.seconds:.0f} s)", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
