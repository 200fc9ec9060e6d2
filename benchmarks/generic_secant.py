"""What a fused secant kernel saves: AG-3 steps with and without it, in one process.

    python benchmarks/generic_secant.py [--case efficientnet_b0] [--d 45] [--rounds 12]
    python benchmarks/generic_secant.py --secant sigmoid --case resnet152_sigmoid --rounds 6

Activations without a closed form (Hardswish, SiLU, GELU, Mish, ...) take the generic secant
``(f(ub) − f(ua)) / (ub − ua)`` with the paper's division-by-zero rule; ``kernels.quotient_secant``
forms it in one pass (``--secant quotient``); ``kernels.sigmoid_secant`` forms Sigmoid's closed
form (``--secant sigmoid``). This script runs AG-3 steps (RMSprop, anchor period ``--d``; ``--d 1``
is AG-3-1, whose anchors are close: many inputs fall under the rule) and alternates, step by
step, the kernel and the PyTorch operations for that secant only — everything else is the same
code — and prints the median step time for each (and, for the generic quotient, the median time
spent forming it). glibc is told to keep freed memory (see ttadapt/memory.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ttadapt.memory import keep_freed_memory  # noqa: E402
from _models import benchmark_case  # noqa: E402

import ttadapt  # noqa: E402
import ttadapt.secant as secant  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="efficientnet_b0", choices=["efficientnet_b0", "mobilenet_v3_small", "resnet152_sigmoid"])
    parser.add_argument("--secant", default="quotient", choices=["quotient", "sigmoid"])
    parser.add_argument("--d", type=int, default=45)
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    keep_freed_memory()
    fused, slope = secant._fused_quotient_secant, secant.secant_slope
    spent = [0.0]

    def timed_slope(*a, **k):
        start = time.perf_counter()
        try:
            return slope(*a, **k)
        finally:
            spent[0] += time.perf_counter() - start

    secant.secant_slope = timed_slope  # (the module's own callers look it up there)
    model, x, y = benchmark_case(args.case)
    optimizer = torch.optim.RMSprop(model.parameters(), 1e-4)
    wrapper = ttadapt.AG3(model, optimizer, d=args.d)

    def closure():
        return F.cross_entropy(model(x), y)

    for _ in range(3):
        wrapper.step(closure)
    steps: dict[bool, list[float]] = {True: [], False: []}
    in_secants: dict[bool, list[float]] = {True: [], False: []}
    sigmoid = ttadapt.kernels.sigmoid_secant
    for _ in range(args.rounds):
        for kernel in (True, False):
            if args.secant == "quotient":
                secant._fused_quotient_secant = fused if kernel else (lambda *a: None)
            else:
                ttadapt.kernels.sigmoid_secant = sigmoid if kernel else (lambda *a, **k: None)
            spent[0] = 0.0
            start = time.perf_counter()
            wrapper.step(closure)
            steps[kernel].append(time.perf_counter() - start)
            in_secants[kernel].append(spent[0])
    secant._fused_quotient_secant, ttadapt.kernels.sigmoid_secant = fused, sigmoid
    print(f"# generic_secant — {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.case}, the {args.secant} secant, AG-3 d={args.d}, RMSprop, {args.rounds} rounds; fused kernels: "
          f"{ttadapt.kernels.status()}")
    for kernel in (True, False):
        forming = (f", forming generic secants {statistics.median(in_secants[kernel]) * 1e3:6.2f} ms"
                   if args.secant == "quotient" else "")
        print(f"{'kernel' if kernel else 'PyTorch ops':12s} step {statistics.median(steps[kernel]) * 1e3:7.1f} ms{forming}")
    ratio = statistics.median(a / b for a, b in zip(steps[True], steps[False]))
    print(f"step with the kernel / without, median of the rounds' ratios: {ratio:.3f}")


if __name__ == "__main__":
    main()
