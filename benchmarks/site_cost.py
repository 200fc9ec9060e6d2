"""Cost of one averaged activation site against the plain activation, measured in one run.

    python benchmarks/site_cost.py [--rounds N] [--shape 16 64 32 32]

One site of the graph pass (the forward of ``SecantActivation``: the model's own call plus the
secant slope towards the other state's input) next to the plain call of the same activation
(an ordinary forward with a graph), for a ReLU called in place (resnet's), ELU, LeakyReLU,
tanh and sigmoid (their closed forms; ReLU, ELU, tanh and sigmoid as fused CPU kernels where
:mod:`ttadapt.kernels` is in use, and again as PyTorch operations), for comparison ELU,
LeakyReLU and sigmoid through the generic quotient with its close-inputs rule in PyTorch
operations, and SiLU, Hardswish and Mish, which have no closed form (the generic quotient as a
fused kernel, and in PyTorch operations; SiLU, Hardswish and Mish also called in place, as
efficientnet's and mobilenet's modules do), in three situations:

* ``apart`` — every input moved (no ties, no close pairs);
* ``2 ties`` — two inputs identical at both states (0/0 for ReLU: the derivative is taken there);
* ``1% close`` — 1% of the inputs moved by less than the close-inputs threshold.

Times are medians over rounds, in µs, with glibc told to keep freed memory (see ttadapt/memory.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ttadapt.memory import keep_freed_memory  # noqa: E402

from ttadapt import kernels  # noqa: E402
from ttadapt.activations import lookup_call  # noqa: E402
from ttadapt.secant import averaged_activation_output  # noqa: E402

# label: (function, the model's call, in place, generic quotient, fused CPU kernels allowed)
CASES = {
    "relu (in place)": (F.relu, lambda u: F.relu(u, inplace=True), True, False, True),
    "relu (in place), PyTorch ops": (F.relu, lambda u: F.relu(u, inplace=True), True, False, False),
    "elu": (F.elu, F.elu, False, False, True),
    "elu, PyTorch ops": (F.elu, F.elu, False, False, False),
    "elu, generic quotient": (F.elu, F.elu, False, True, False),
    "leaky_relu": (F.leaky_relu, F.leaky_relu, False, False, True),
    "leaky_relu, generic quotient": (F.leaky_relu, F.leaky_relu, False, True, False),
    "tanh": (torch.tanh, torch.tanh, False, False, True),
    "tanh, PyTorch ops": (torch.tanh, torch.tanh, False, False, False),
    "sigmoid": (torch.sigmoid, torch.sigmoid, False, False, True),
    "sigmoid, PyTorch ops": (torch.sigmoid, torch.sigmoid, False, False, False),
    "sigmoid, generic quotient": (torch.sigmoid, torch.sigmoid, False, True, False),
    "silu (generic quotient)": (F.silu, F.silu, False, False, True),
    "silu, PyTorch ops": (F.silu, F.silu, False, False, False),
    "hardswish (generic quotient)": (F.hardswish, F.hardswish, False, False, True),
    "hardswish, PyTorch ops": (F.hardswish, F.hardswish, False, False, False),
    "silu (in place)": (F.silu, lambda u: F.silu(u, inplace=True), True, False, True),
    "hardswish (in place)": (F.hardswish, lambda u: F.hardswish(u, inplace=True), True, False, True),
    "mish (generic quotient)": (F.mish, F.mish, False, False, True),
    "mish (in place)": (F.mish, lambda u: F.mish(u, inplace=True), True, False, True),
}


def other_input(ua: torch.Tensor, situation: str) -> torch.Tensor:
    ub = ua + 0.3 * torch.randn_like(ua)
    ub[ub == ua] += 0.5  # a move that rounded away
    flat_a, flat_b = ua.view(-1), ub.view(-1)
    if situation == "2 ties":
        idx = torch.randint(0, ua.numel(), (2,))
        flat_b[idx] = flat_a[idx]
    elif situation == "1% close":
        idx = torch.randperm(ua.numel())[: ua.numel() // 100]
        flat_b[idx] = flat_a[idx] + 1e-5 * (1 + flat_a[idx].abs())  # below the threshold, never a tie
    return ub


def median_us(f, setup, rounds: int) -> float:
    times = []
    for r in range(rounds + 5):
        args = setup()
        start = time.perf_counter()
        f(*args)
        if r >= 5:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--shape", type=int, nargs="+", default=[16, 64, 32, 32])
    args = parser.parse_args()
    cached = keep_freed_memory()
    shape = tuple(args.shape)
    print(f"# site_cost — {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"input {'×'.join(map(str, shape))} float32, freed memory kept: {cached}")
    print()
    lib = kernels._library()
    print(f"(fused CPU kernels: {kernels.status()})")
    print()
    print("| activation | plain call | averaged: apart | averaged: 2 ties | averaged: 1% close |")
    print("|---|---|---|---|---|")
    torch.manual_seed(0)
    base = torch.randn(shape)
    scale = torch.ones((), requires_grad=True)
    for label, (fn, call, inplace, generic, fused) in CASES.items():
        kernels._state["lib"] = lib if fused else None
        act = lookup_call(fn)[0]
        if generic:
            act = dataclasses.replace(act, secant=None)
        inputs = {s: other_input(base, s) for s in ("apart", "2 ties", "1% close")}

        def plain(u, _ub, _fb):
            return call(u)

        def averaged(u, ub, fb):
            return averaged_activation_output(act, call, u, ub, {}, inplace, True, fb, True)

        row = [median_us(plain, lambda: (base * scale, None, None), args.rounds)]
        for s, ub in inputs.items():
            # the pass at `other` hands over its kept input and output, which the engine may overwrite
            row.append(median_us(averaged, lambda ub=ub: (base * scale, ub.clone(), act.fn(ub)), args.rounds))
        print(f"| {label} | " + " | ".join(f"{t:,.0f} µs" for t in row) + " |", flush=True)
    print()
    print("(averaged: the model's call and the slope; f(ub), kept by the pass at `other`, is computed outside the timing)")


if __name__ == "__main__":
    main()
