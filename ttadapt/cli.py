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
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False)
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
    model: Annotated[str, typer.Option("--model", "-m", help="A torchvision model name, e.g. resnet18 (random weights).")],
    input_size: Annotated[tuple[int, int, int], typer.Option("--input-size", help="Channels, height, width of the example input.")] = (3, 224, 224),
    batch: Annotated[int, typer.Option("--batch", help="Example batch size.")] = 2,
    linear: Annotated[bool, typer.Option("--linear", help="Also list the affine layers the Linear variant averages.")] = False,
) -> None:
    """Print which pointwise calls of a model's forward pass are averaged."""
    import torch
    import torchvision

    from .inspection import inspect as run_inspect

    names = set(torchvision.models.list_models())
    if model not in names:
        close = sorted(n for n in names if model.lower() in n)[:5]
        _fail(f"unknown model {model!r}" + (f"; did you mean one of: {', '.join(close)}?" if close else "; see torchvision.models.list_models()"))
    if batch < 1 or min(input_size) < 1:
        _fail("--batch and --input-size must be positive")
    try:
        net = torchvision.models.get_model(model, weights=None)
        x = torch.randn(batch, *input_size)
        report = run_inspect(net, x, linear=linear)
    except (RuntimeError, ValueError) as err:
        _fail(f"{model} does not run on input {tuple(x.shape)}: {str(err).splitlines()[0]}")
    console.print(str(report), highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
