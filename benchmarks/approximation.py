"""How well one averaged backward pass approximates the exact average gradient.

    python benchmarks/approximation.py [--spans 1 10 100] [--models model_b relu_cnn row_lstm]

A model is trained with Adam on synthetic data (random images labelled by a fixed random
teacher network — offline and reproducible). For a span of k optimizer steps from θ_start to
θ_end, on one fixed batch, three estimates of AVG[θ_start, θ_end] ∇ℓ are compared with the
exact value (Gauss–Legendre quadrature of plain autograd gradients, `path_average_grad`):

* plain   — the ordinary gradient at θ_end;
* averaged — `averaged_grad` with graph state θ_end and other = θ_start (AG-3's use);
* Linear   — the same with `linear=True`.

Everything runs in float64 so that the reference, not rounding, limits the comparison.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ttadapt  # noqa: E402

from _models import RowLSTM, model_b, small_relu_cnn  # noqa: E402

MODELS = {  # name: (label, builder, quadrature points, Adam's learning rate)
    "model_b": ("Model B (tanh, ELU), Adam lr 1e-2", model_b, 64, 1e-2),
    "relu_cnn": ("ReLU CNN, Adam lr 1e-3", small_relu_cnn, 256, 1e-3),
    "row_lstm": ("row LSTM (32 units), Adam lr 1e-2", RowLSTM, 64, 1e-2),
}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads.values()])


def run(name: str, build, points: int, spans: list[int], lr: float, warmup: int) -> list[str]:
    torch.manual_seed(0)
    model = build().double()
    teacher = build().double()
    x_eval = torch.randn(128, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        y_eval = teacher(x_eval).argmax(1)

    def closure():
        return F.cross_entropy(model(x_eval), y_eval)

    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def train(steps: int) -> None:
        for _ in range(steps):
            x = torch.randn(128, 1, 28, 28, dtype=torch.float64)
            with torch.no_grad():
                y = teacher(x).argmax(1)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    train(warmup)
    rows = []
    for span in spans:
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        train(span)
        exact = flat(ttadapt.path_average_grad(model, closure, start, None, points=points))
        params = [p for p in model.parameters()]
        estimates = {
            "plain": torch.cat([g.flatten() for g in torch.autograd.grad(closure(), params)]),
            "averaged": flat(ttadapt.averaged_grad(model, closure, start)),
            "Linear": flat(ttadapt.averaged_grad(model, closure, start, linear=True)),
        }
        step = torch.cat([(p.detach() - start[n]).flatten() for n, p in model.named_parameters()])
        cells = []
        for key in ("plain", "averaged", "Linear"):
            est = estimates[key]
            cells.append(f"{cosine(est, exact):.6f} / {float((est - exact).norm() / exact.norm()):.2e}")
        rows.append(f"| {name} | {span} | {float(step.norm()):.3g} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, nargs="*", default=[1, 10, 100])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    print(f"# approximation — {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, float64, Adam")
    print()
    print("cosine / relative error against the exact average gradient")
    print()
    print("| model | span (steps) | ‖θ_end − θ_start‖ | plain | averaged | Linear variant |")
    print("|---|---|---|---|---|---|")
    for key in args.models:
        label, build, points, lr = MODELS[key]
        run(label, build, points=points, spans=args.spans, lr=lr, warmup=20)


if __name__ == "__main__":
    main()
