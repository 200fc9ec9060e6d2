"""Where one AG-1 / AG-2 / AG-3 step's time goes, next to the plain step of the same optimizer.

    python benchmarks/step_breakdown.py [--case resnet18] [--optimizer adam] [--method AG1] [--steps 8]

Wraps the parts of a wrapper's step with wall-clock timers (the graph forward, the two
backwards, the pass at the other state, the base optimizer's step, the state snapshot, the
non-finite checks, the AG-1/AG-2 update, the fused forecast where it applies; AG-3: its two passes
and its backward; the plain step: its forward, backward and optimizer step; a no-graph forward,
the pass the cost model adds, and that pass with the Conv2d weights in channels_last memory;
Python's cyclic garbage collector, per generation, wherever it runs) and prints each part's mean per step over ``--steps``
steps after three warm-up steps, next to the plain step's (zero_grad, forward, backward, step),
the steps interleaved (one of each per round) so that the machine's drift hits all alike. glibc
is told to keep freed memory (see ttadapt/memory.py). Parts nest: "pass at other + averaged backward"
contains "pass at other".
"""

from __future__ import annotations

import argparse
import collections
import functools
import gc
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ttadapt.memory import keep_freed_memory  # noqa: E402
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
    torch.Tensor.backward = timed("backward (loss.backward: AG-3's averaged one, the plain step's)", torch.Tensor.backward)
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
    parser.add_argument("--case", default="resnet18", choices=["resnet18", "model_b", "mobilenet_v3_small", "efficientnet_b0", "resnet152", "lstm", "gru", "lstm_packed", "gpt2"])
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

    timed_forward = timed("forward", closure)

    def plain():
        optimizer.zero_grad(set_to_none=True)
        timed_forward().backward()
        optimizer.step()

    def no_graph_forward():  # the cost model's extra pass: 2·T_fwd + T_bwd + T_opt
        with torch.no_grad():
            closure()

    # the same pass with the Conv2d weights in channels_last (NHWC) memory: on the CPU oneDNN then
    # runs the whole pass in NHWC, without NCHW <-> blocked reorders around each convolution —
    # measured as a candidate for the pass at the other state (see docs/step_cost.md)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    nhwc = {id(m): m.weight.detach().contiguous(memory_format=torch.channels_last) for m in convs}

    def no_graph_forward_nhwc():
        saved = [m._parameters["weight"] for m in convs]
        for m in convs:
            m._parameters["weight"] = nhwc[id(m)]
        try:
            with torch.no_grad():
                closure()
        finally:
            for m, w in zip(convs, saved):
                m._parameters["weight"] = w

    def run(steps: dict[str, Callable[[], None]]) -> dict[str, tuple[float, dict[str, float]]]:
        """Each step's mean time and parts, the steps interleaved (one of each per round) so that
        the machine's drift hits all alike."""
        for _ in range(3):
            for step in steps.values():
                step()
        totals = {name: 0.0 for name in steps}
        parts: dict[str, dict[str, float]] = {name: collections.defaultdict(float) for name in steps}
        for _ in range(args.steps):
            for name, step in steps.items():
                TIMES.clear()
                start = time.perf_counter()
                step()
                totals[name] += time.perf_counter() - start
                for k, v in TIMES.items():
                    parts[name][k] += v
        return {name: (totals[name] / args.steps, {k: v / args.steps for k, v in parts[name].items()}) for name in steps}

    steps = {"method": lambda: wrapper.step(closure), "plain": plain, "no-graph forward": no_graph_forward}
    if convs:
        steps["no-graph forward, NHWC convolutions"] = no_graph_forward_nhwc
    results = run(steps)
    (total, parts), (base, base_parts), (nograd, _) = results["method"], results["plain"], results["no-graph forward"]
    print(f"# step_breakdown — {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.case}, {args.optimizer}, freed memory kept: {cached}")
    print()
    print(f"{args.method} step {total * 1e3:.1f} ms; plain step {base * 1e3:.1f} ms "
          f"(its optimizer step {base_parts.get('base optimizer step', 0.0) * 1e3:.1f} ms); ratio {total / base:.2f}")
    print(f"no-graph forward {nograd * 1e3:.1f} ms: the cost model's floor for AG-3, (plain + no-graph forward) / plain, "
          f"is {(base + nograd) / base:.2f}")
    if convs:
        nhwc_time = results["no-graph forward, NHWC convolutions"][0]
        print(f"no-graph forward with the Conv2d weights channels_last (NHWC) {nhwc_time * 1e3:.1f} ms "
              f"({nhwc_time / nograd:.2f} of it; a floor of {(base + nhwc_time) / base:.2f} with it)")
    print()
    print(f"| part | {args.method}: ms per step | plain step: ms per step |")
    print("|---|---|---|")
    for name, t in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {t * 1e3:.1f} | {base_parts[name] * 1e3:.1f} |" if name in base_parts else f"| {name} | {t * 1e3:.1f} | |")
    for name, t in base_parts.items():
        if name not in parts:
            print(f"| {name} | | {t * 1e3:.1f} |")


if __name__ == "__main__":
    main()
