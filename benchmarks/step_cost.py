"""Time and peak memory of one optimizer step of each wrapper, relative to the base optimizer's
plain step, measured in one run.

    python benchmarks/step_cost.py [--cases resnet18 model_b] [--optimizers rmsprop adam soap] [--rounds N]
    python benchmarks/step_cost.py --cases resnet152 --methods AG3 SAM --optimizers soap adam --ag3-d 300   # issue 7
    python benchmarks/step_cost.py --cases mobilenet_v3_small efficientnet_b0 --optimizers adam   # other architectures
    python benchmarks/step_cost.py --cases lstm gru lstm_packed --optimizers adam   # recurrent layers

Each method steps its own copy of the model with its own optimizer (same initial weights, same
batch). Time: interleaved rounds (plain, AG-1, AG-2, ..., plain, ...) so machine drift hits all
alike (with glibc told to keep freed memory, see ttadapt/memory.py, so that no method pays for the page
faults of the one before it). A method's figure is, by default (``--ratio paired``), the median
over the rounds of its step's time divided by the plain step's time *in the same round* — the
two are seconds apart, so the machine's drift over minutes (up to 8x here) cancels — with the
interquartile range of those ratios in brackets; ``--ratio medians`` divides the methods' median
times instead (the figure of earlier rounds). The plain step's own time is the median (or with
``--statistic mean`` the mean) over the rounds. All steppers step once per round, so SOAP's
preconditioner refreshes (every 10 steps) fall into the same rounds for all. Memory: peak bytes of
tensors alive at once during one step (dispatch-level tracker, see _memory.py), optimizer state
created before the call excluded. Targets (issue 3): AG-3 <= 1.35x, AG-1/AG-2 <= 2.1x, AG-3 <=
0.7x SAM. Where AG-3 is measured, each round also times a no-graph forward (with the loss, as
AG-3's anchor pass runs the closure) of another copy of the model right after the plain step:
"AG3 floor" is the spec's cost model for AG-3 on this machine, (plain step + that forward) /
plain step, and "AG3 / floor" AG-3's step over that sum — paired per round like the others.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ttadapt  # noqa: E402

from ttadapt.memory import keep_freed_memory  # noqa: E402
from _memory import peak_tensor_bytes  # noqa: E402
from _models import benchmark_case  # noqa: E402

METHODS = ("plain", "AG1", "AG2", "AG1-Linear", "AG2-Linear", "AG3", "SAM")
# resnet152: batch 4 at 64×64; mobilenet_v3_small, efficientnet_b0: other architectures (Hardswish,
# SiLU and sigmoid gates), batch 16 at 64×64; lstm, gru: a recurrent classifier (batch 32, 20 steps;
# lstm_packed: packed, lengths 5..20); gpt2: a small GPT-2 from transformers (4 layers, width 256),
# batch 8 of 64 tokens
CASES = ("resnet18", "model_b", "resnet152", "mobilenet_v3_small", "efficientnet_b0", "lstm", "gru", "lstm_packed",
         "gpt2")
LR = {"rmsprop": 1e-4, "adam": 1e-4, "soap": 1e-4}


def build_case(case: str):
    if case not in CASES:
        raise SystemExit(f"unknown case {case!r}; choose {', '.join(CASES)}")
    return benchmark_case(case)


def make_step(method: str, model, optimizer_name: str, x, y, ag3_d: int = 45):
    opt = ttadapt.create_optimizer(optimizer_name, model.parameters(), LR[optimizer_name])

    def closure():
        return F.cross_entropy(model(x), y)

    if method == "plain":
        def step():
            opt.zero_grad(set_to_none=True)
            loss = closure()
            loss.backward()
            opt.step()
            return loss.detach()

        return step
    wrapper = {
        "AG1": lambda: ttadapt.AG1(model, opt),
        "AG2": lambda: ttadapt.AG2(model, opt),
        "AG1-Linear": lambda: ttadapt.AG1(model, opt, linear=True),
        "AG2-Linear": lambda: ttadapt.AG2(model, opt, linear=True),
        "AG3": lambda: ttadapt.AG3(model, opt, d=ag3_d),
        "SAM": lambda: ttadapt.SAM(model, opt, rho=0.05),
    }[method]()
    return lambda: wrapper.step(closure)


def time_ratio(times: dict[str, list[float]], method: str, over: str, summary: dict[str, float], how: str,
               unit: str = "") -> str:
    """``method``'s time over ``over``'s, as a table cell: with ``how="paired"`` the median of
    the per-round ratios and, in brackets, their interquartile range; else the summaries' ratio."""
    if how != "paired":
        return f"{summary[method] / summary[over]:.2f}{unit}"
    ratios = [a / b for a, b in zip(times[method], times[over])]
    if len(ratios) < 4:
        return f"{statistics.median(ratios):.2f}{unit}"
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return f"{statistics.median(ratios):.2f}{unit} [{q1:.2f}–{q3:.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=["resnet18", "model_b"])
    parser.add_argument("--optimizers", nargs="*", default=["rmsprop", "adam", "soap"])
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--rounds", type=int, default=0, help="timing rounds (default: 60 model_b, 5 resnet152, 10 the others)")
    parser.add_argument("--statistic", choices=("median", "mean"), default="median",
                        help="summary of the plain step's times, and with --ratio medians of every method's")
    parser.add_argument("--ratio", choices=("paired", "medians"), default="paired",
                        help="paired: median of per-round ratios (drift cancels); medians: ratio of the summaries")
    parser.add_argument("--ag3-d", type=int, default=45, help="AG-3's anchor period (the paper: 45 Adam/RMSprop, 300 SOAP)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    args = parser.parse_args()
    methods = ["plain"] + [m for m in args.methods if m != "plain"]
    cached = keep_freed_memory()
    print(f"# step_cost — {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, freed memory kept by the C allocator: {cached}")
    print()
    floor = "AG3" in methods  # the cost model's floor for AG-3: the plain step plus one no-graph forward
    head = " | ".join(f"{m} time" + ("" if args.no_memory else " / mem") for m in methods[1:])
    floor_head = " | AG3 floor | AG3 / floor" if floor else ""
    print(f"| model | optimizer | plain step | {head} | AG3 / SAM time{floor_head} |")
    print("|---|---|---|" + "---|" * (len(methods) - 1) + "---|" + ("---|---|" if floor else ""))
    for case in args.cases:
        base_model, x, y = build_case(case)
        rounds = args.rounds or {"model_b": 60, "resnet152": 5}.get(case, 10)
        for optimizer_name in args.optimizers:
            steps = {m: make_step(m, copy.deepcopy(base_model), optimizer_name, x, y, args.ag3_d) for m in methods}
            for step in steps.values():  # warm up; creates optimizer state
                step()
                step()
            times = {m: [] for m in methods}
            forward_times: list[float] = []
            forward_model = copy.deepcopy(base_model)
            for _ in range(rounds):
                for m, step in steps.items():
                    start = time.perf_counter()
                    step()
                    times[m].append(time.perf_counter() - start)
                    if m == "plain" and floor:  # (right after the plain step it is added to)
                        start = time.perf_counter()
                        with torch.no_grad():
                            F.cross_entropy(forward_model(x), y)
                        forward_times.append(time.perf_counter() - start)
            summary = statistics.median if args.statistic == "median" else statistics.fmean
            mean = {m: summary(v) for m, v in times.items()}
            mem = {m: (float("nan") if args.no_memory else peak_tensor_bytes(step)) for m, step in steps.items()}
            mem_cell = (lambda m: "") if args.no_memory else (lambda m: f" / {mem[m] / mem['plain']:.2f}x")
            cells = [f"{time_ratio(times, m, 'plain', mean, args.ratio, 'x')}{mem_cell(m)}" for m in methods[1:]]
            ag3_sam = time_ratio(times, "AG3", "SAM", mean, args.ratio) if "AG3" in mean and "SAM" in mean else "-"
            plain_mem = "" if args.no_memory else f", {mem['plain'] / 2**20:.1f} MB"
            floor_cells = ""
            if floor:
                times["floor"] = [p + f for p, f in zip(times["plain"], forward_times)]
                mean["floor"] = summary(times["floor"])
                floor_cells = (f" | {time_ratio(times, 'floor', 'plain', mean, args.ratio, 'x')}"
                               f" | {time_ratio(times, 'AG3', 'floor', mean, args.ratio)}")
            print(f"| {case} | {optimizer_name} | {mean['plain'] * 1e3:.0f} ms{plain_mem} | "
                  + " | ".join(cells) + f" | {ag3_sam}{floor_cells} |", flush=True)


if __name__ == "__main__":
    main()
