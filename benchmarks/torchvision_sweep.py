"""Every torchvision classification model through the engine: does it run, what does
``inspect`` report, and does the averaged gradient with ``other`` equal to the current
parameters give the ordinary one?

    python benchmarks/torchvision_sweep.py [--models resnet18 vit_b_16 ...] [--skip vit_h_14]

Random weights, 10 classes, eval mode (no dropout; BatchNorm on running statistics, so the
ordinary gradient is a fixed oracle), a batch of 2 at 64 × 64 (224 for the vision
transformers, 299 for Inception). Per model: the pointwise calls ``inspect`` finds and how many
it does not average; the largest difference between ``averaged_grad(model, closure, {})`` and
``torch.autograd.grad`` relative to the largest gradient entry; whether the averaged gradient
towards the parameters scaled by 1.01 is finite; the RuntimeWarnings ttadapt gave; seconds.
Prints a Markdown table and a summary line.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F
import torchvision

import ttadapt


def _input_size(name: str) -> int:
    if name.startswith(("vit", "swin", "maxvit")):
        return 224
    return 299 if name.startswith("inception") else 64


def check(name: str) -> tuple[str, str, str, bool, str]:
    """(inspect summary, same-state relative error, NOT-averaged count, finite, warnings) of one model."""
    torch.manual_seed(0)
    kwargs: dict = {"num_classes": 10}
    if name.startswith(("inception", "googlenet")):
        kwargs.update(aux_logits=False, init_weights=False)
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    size = _input_size(name)
    x, y = torch.randn(2, 3, size, size), torch.randint(0, 10, (2,))

    def closure():
        return F.cross_entropy(model(x), y)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = ttadapt.inspect(model, x)
        same = ttadapt.averaged_grad(model, closure, {})
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        ordinary = torch.autograd.grad(closure(), list(params.values()), allow_unused=True)
        scale = max(g.abs().max().item() for g in ordinary if g is not None)
        err = max((same[n] - (g if g is not None else 0)).abs().max().item() for n, g in zip(params, ordinary))
        moved = ttadapt.averaged_grad(model, closure, {n: p.detach() * 1.01 for n, p in params.items()})
        finite = all(bool(torch.isfinite(g).all()) for g in moved.values())
    ours = sorted({str(w.message).split(";")[0] for w in caught if issubclass(w.category, RuntimeWarning)})
    return (str(len(report.calls)), f"{err / scale:.1e}", str(len(report.unaveraged)), finite, "; ".join(ours))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="torchvision model names (default: every classification model)")
    parser.add_argument("--skip", nargs="*", default=["vit_h_14"], help="models left out (default: vit_h_14, 632M parameters)")
    args = parser.parse_args()
    names = args.models or [n for n in torchvision.models.list_models(module=torchvision.models) if n not in args.skip]
    print(f"# torchvision_sweep — {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, torchvision {torchvision.__version__}")
    print()
    print("| model | pointwise calls | not averaged | same-state error (relative) | finite | ttadapt warnings | s |")
    print("|---|---|---|---|---|---|---|")
    failed, worst = [], 0.0
    for name in names:
        start = time.perf_counter()
        try:
            calls, err, unaveraged, finite, warned = check(name)
        except Exception as exc:  # noqa: BLE001 (a sweep reports every failure and goes on)
            failed.append(name)
            print(f"| {name} | ERROR {type(exc).__name__}: {str(exc)[:120]} | | | | | |", flush=True)
            continue
        worst = max(worst, float(err))
        if not finite:
            failed.append(name)
        print(f"| {name} | {calls} | {unaveraged} | {err} | {'yes' if finite else 'NO'} | {warned} | "
              f"{time.perf_counter() - start:.0f} |", flush=True)
    print()
    print(f"{len(names) - len(failed)} of {len(names)} models ran with finite averaged gradients; largest same-state "
          f"error {worst:.1e}" + (f"; failed: {', '.join(failed)}" if failed else ""))


if __name__ == "__main__":
    main()
