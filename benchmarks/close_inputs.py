"""The generic secant's close inputs: the derivative everywhere, or at the reported inputs only.

    python benchmarks/close_inputs.py [--rounds 15] [--fractions 0.003 0.01 0.06 0.12]

Activations without a closed form (SiLU, Hardswish, GELU, ..., and activation modules such as
``transformers``' ``NewGELUActivation``) take the quotient ``(f(ub) − f(ua)) / (ub − ua)``,
and the derivative at ``ua`` where the inputs are too close for it. The fused kernel reports
where (``kernels.quotient_secant``) up to a cap, ``kernels.close_cap``: within it the derivative
is evaluated at those inputs alone, past it everywhere and put in place by a second pass. Here
``secant.secant_slope`` on a resnet-sized site (16×64×32×32 float32), a given fraction of the
inputs close and the rest apart, runs with the cap as it is and with the old one (256), the
two alternating over the rounds (the order flipped every round); medians in ms. SiLU's derivative is ATen's ``silu_backward``,
the module's a backward through it (what the engine takes for a registered module).
glibc is told to keep freed memory (see ttadapt/memory.py).
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

from ttadapt import kernels, secant  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.003, 0.01, 0.06, 0.12])
    args = parser.parse_args()
    cached = keep_freed_memory()
    if not kernels.available():
        raise SystemExit("the fused kernels are not in use here (no C compiler?): nothing to compare")
    activations = [("silu", F.silu, lambda u: torch.ops.aten.silu_backward(torch.ones_like(u), u))]
    try:
        from transformers.activations import NewGELUActivation

        gelu = NewGELUActivation()
        activations.append(("transformers NewGELUActivation", gelu,
                            lambda u: torch.autograd.functional.vjp(gelu, u, torch.ones_like(u))[1]))
    except ImportError:
        pass
    current = kernels.close_cap
    n = 16 * 64 * 32 * 32
    print(f"# close_inputs — {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{n:,} elements, cap {current(n):,} (old 256), freed memory kept: {cached}")
    print()
    print("| activation | close inputs | derivative everywhere (cap 256) | at the reported inputs |")
    print("|---|---|---|---|")
    for name, fn, derivative in activations:
        for fraction in args.fractions:
            g = torch.Generator().manual_seed(0)
            ua = torch.randn(n, generator=g) * 2
            ub = ua + 0.3 * torch.randn(n, generator=g)
            close = torch.randperm(n, generator=g)[:int(n * fraction)]
            ub[close] = ua[close] * (1 + 1e-5)
            fa, fb = fn(ua), fn(ub)
            times: dict[str, list[float]] = {"old": [], "new": []}
            for k in range(args.rounds):
                for which in (("old", "new") if k % 2 else ("new", "old")):  # (the order flipped every round)
                    kernels.close_cap = (lambda k: 256) if which == "old" else current
                    b, f_b = ub.clone(), fb.clone()
                    start = time.perf_counter()
                    secant.secant_slope(fn, derivative, ua, fa, b, True, f_b, True)
                    times[which].append(time.perf_counter() - start)
            kernels.close_cap = current
            old, new = (statistics.median(times[k]) * 1e3 for k in ("old", "new"))
            print(f"| {name} | {fraction:.1%} ({int(n * fraction):,}) | {old:.2f} ms | {new:.2f} ms |")


if __name__ == "__main__":
    main()
