"""Where one AG-1 / AG-2 / AG-3 step's time goes, next to the plain step of the same optimizer.

    python benchmarks/step_breakdown.py [--case resnet18] [--optimizer adam] [--method AG1] [--steps 8]

Wraps the parts of a wrapper's step with wall-clock timers (the graph forward, the two
backwards, the pass at the other state, the base optimizer's step, the state snapshot, the
non-finite checks, the AG-1/AG-2 update, the fused forecast where it applies; AG-3: its two passes;
Python's cyclic garbage collector, per generation, wherever it runs) and prints each part's mean per step over ``--steps``
steps after three warm-up steps, then the plain step (zero_grad, forward, backward, step) with
its optimizer step. glibc is told to keep freed memory (see _alloc.py). Parts nest: "pass at
other + averaged backward" contains "pass at other".
"""

from __future__ import annotations

import argparse
import collections
import functools
import gc
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _alloc import keep_freed_memory  # noqa: E402
from _models import benchmark_case  # noqa: E402

import ttadapt  # noqa: E402
import ttadapt.averaged as averaged  # noqa: E402
import ttadapt.optim.ag3 as ag3  # noqa: E402
import ttadapt.optim.forward_looking as forward_looking  # noqa: E402

TIMES: dict[str, float] = collections.defaultdict(float)


def timed(name: str, f):
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            TIMES[name] += time.perf_counter() - start

    return wrapper


def instrument(optimizer) -> None:
    D = averaged.DeferredAverage
    D.__init__ = timed("graph forward (AG-1/AG-2)", D.__init__)
    D.ordinary_grad = timed("ordinary backward (AG-1/AG-2)", D.ordinary_grad)
    D.averaged_grad = timed("pass at other + averaged backward (AG-1/AG-2)", D.averaged_grad)
    averaged._record_pass = timed("pass at other", averaged._record_pass)
    ag3.averaged_loss = timed("both passes (AG-3)", ag3.averaged_loss)
    forward_looking.OptimizerSnapshot.__init__ = timed("optimizer-state snapshot", forward_looking.OptimizerSnapshot.__init__)
    forward_looking.fused_forecast = timed("fused forecast step (Adam/AdamW/RMSprop)", forward_looking.fused_forecast)
    forward_looking.all_finite = timed("non-finite checks", forward_looking.all_finite)
    ag3.all_finite = timed("non-finite checks", ag3.all_finite)
    W = forward_looking._ForwardLooking
    W._ag1_update = timed("AG-1 update", W._ag1_update)
    W._ag2_update = timed("AG-2 update (with its dry step)", W._ag2_update)
    optimizer.step = timed("base optimizer step", optimizer.step)


_GC_START: list[float] = [0.0]


def time_collector(phase: str, info: dict) -> None:
    """gc callback: the cyclic garbage collector's time, per generation collected."""
    if phase == "start":
        _GC_START[0] = time.perf_counter()
    else:
        TIMES[f"cyclic garbage collector, generation {info['generation']}"] += time.perf_counter() - _GC_START[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="resnet18", choices=["resnet18", "model_b"])
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--method", default="AG1", choices=["AG1", "AG2", "AG3"])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    cached = keep_freed_memory()
    model, x, y = benchmark_case(args.case)
    optimizer = ttadapt.create_optimizer(args.optimizer, model.parameters(), 1e-4)
    instrument(optimizer)
    gc.callbacks.append(time_collector)

    def closure():
        return F.cross_entropy(model(x), y)

    wrapper = {"AG1": ttadapt.AG1, "AG2": ttadapt.AG2, "AG3": lambda m, o: ttadapt.AG3(m, o, d=45)}[args.method](model, optimizer)

    def plain():
        optimizer.zero_grad(set_to_none=True)
        closure().backward()
        optimizer.step()

    def run(step) -> tuple[float, dict[str, float]]:
        for _ in range(3):
            step()
        TIMES.clear()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        total = (time.perf_counter() - start) / args.steps
        return total, {k: v / args.steps for k, v in TIMES.items()}

    total, parts = run(lambda: wrapper.step(closure))
    base, base_parts = run(plain)
    print(f"# step_breakdown — {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.case}, {args.optimizer}, freed memory kept: {cached}")
    print()
    print(f"{args.method} step {total * 1e3:.1f} ms; plain step {base * 1e3:.1f} ms "
          f"(its optimizer step {base_parts.get('base optimizer step', 0.0) * 1e3:.1f} ms); ratio {total / base:.2f}")
    print()
    print("| part | ms per step |")
    print("|---|---|")
    for name, t in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {t * 1e3:.1f} |")


if __name__ == "__main__":
    main()
