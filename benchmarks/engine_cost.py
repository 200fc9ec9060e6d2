"""Cost of one averaged gradient against one ordinary forward+backward, measured in one run.

    python benchmarks/engine_cost.py [--rounds N] [--cases ...] [--breakdown | --split]

Time: medians over interleaved rounds (ordinary, no-grad forward, averaged, Linear variant,
ordinary, ...), so that drifts of a shared machine hit all alike, with glibc told to keep freed
memory (see ttadapt/memory.py: no method pays for the page faults of the one before it). The "cost-model floor" is the
spec's 2·T_fwd + T_bwd measured: (no-grad forward + ordinary) / ordinary — what an averaged step
would cost if the secants were free. Memory: the peak bytes of tensors alive at
once during one call (every tensor an operator creates, forward and backward, counted by a
dispatch-level tracker), next to what the spec allows on top of the ordinary step — the
activation inputs the engine keeps (counted by the engine) plus one copy of the parameters.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ttadapt  # noqa: E402
from ttadapt.averaged import averaged_loss  # noqa: E402
from ttadapt.sites import SiteSession  # noqa: E402

from ttadapt.memory import keep_freed_memory  # noqa: E402
from _memory import peak_tensor_bytes  # noqa: E402
from _models import benchmark_case  # noqa: E402


def build(case: str):
    model, x, y = benchmark_case(case)
    other = {n: p.detach() + 1e-2 * torch.randn_like(p) for n, p in model.named_parameters()}

    def closure():
        return F.cross_entropy(model(x), y)

    params = [p for p in model.parameters()]
    def no_grad_forward():
        with torch.no_grad():
            closure()

    methods = {
        "ordinary": lambda: torch.autograd.grad(closure(), params),
        "no-grad forward": no_grad_forward,
        "averaged": lambda: ttadapt.averaged_grad(model, closure, other),
        "linear": lambda: ttadapt.averaged_grad(model, closure, other, linear=True),
    }
    return model, closure, other, methods


def stored_bytes(model, closure, other, linear: bool) -> int:
    """What the pass at `other` keeps: the activation (and, Linear variant, affine) inputs."""
    session = SiteSession(linear=linear)
    averaged_loss(model, closure, other, linear=linear, session=session)
    return session.recorded_bytes


def breakdown(model, closure, other, rounds: int) -> dict[str, float]:
    """Medians (ms) of the averaged gradient's parts next to their ordinary counterparts: the
    pass at `other` against a no-graph forward, the graph pass against a forward with a graph,
    and the two backwards."""
    from ttadapt.averaged import _record_pass
    from ttadapt.states import ModelLayout, resolve_state

    layout = ModelLayout(model)
    state = resolve_state(layout, other)
    params = [p for p in model.parameters() if p.requires_grad]

    def timed(f):
        start = time.perf_counter()
        out = f()
        return time.perf_counter() - start, out

    parts: dict[str, list[float]] = {k: [] for k in ("no-grad forward", "pass at other", "forward", "graph pass",
                                                       "ordinary backward", "averaged backward")}
    for r in range(rounds + 2):
        with torch.no_grad():
            t_ng, _ = timed(closure)
        t_fwd, loss = timed(closure)
        t_bwd, _ = timed(lambda: torch.autograd.grad(loss, params))
        session = SiteSession()
        t_rec, _ = timed(lambda: _record_pass(model, closure, layout, session, state, want_seeds=False))

        def graph_pass():
            with torch.enable_grad(), session.run(model, "apply", layout):
                return closure()

        t_apply, loss = timed(graph_pass)
        session.finish_apply()
        t_abwd, _ = timed(lambda: torch.autograd.grad(loss, params))
        if r >= 2:  # warm-up
            for k, v in zip(parts, (t_ng, t_rec, t_fwd, t_apply, t_bwd, t_abwd)):
                parts[k].append(v)
    return {k: statistics.median(v) * 1e3 for k, v in parts.items()}


def graph_split(model, closure, other, rounds: int) -> dict[str, float]:
    """Medians (ms) of the graph pass built four ways, to split its excess over a forward: a
    plain forward with a graph; the pass with every site handed straight to the model's call
    (the function mode's interception alone); with the sites paired and joined to their
    backward but the secant's arithmetic skipped (the slope replaced by the kept
    input); and the real pass."""
    from ttadapt import secant, sites
    from ttadapt.averaged import _record_pass
    from ttadapt.states import ModelLayout, resolve_state

    layout = ModelLayout(model)
    state = resolve_state(layout, other)
    real_site, real_slope, real_short = SiteSession._on_activation, secant._output_and_slope, sites._small_site

    def passthrough(self, func, act, form, args, kwargs):
        if self.phase != "apply":
            return real_site(self, func, act, form, args, kwargs)
        self.records[self.cursor] = None
        self.cursor += 1
        return func(*args, **kwargs)

    def no_arithmetic(u, ub, call, *rest):
        return call(u), ub

    def short_no_arithmetic(checked, act, func, args, kwargs, u, ub, *rest):  # small sites' short route
        with torch.no_grad():
            y = func(*args, **kwargs)
        return secant.secant_product(u, y, ub)

    def graph_pass() -> float:
        session = SiteSession()
        _record_pass(model, closure, layout, session, state, want_seeds=False)
        start = time.perf_counter()
        with torch.enable_grad(), session.run(model, "apply", layout):
            closure()
        elapsed = time.perf_counter() - start
        session.finish_apply()
        return elapsed

    def forward() -> float:
        start = time.perf_counter()
        closure()
        return time.perf_counter() - start

    parts: dict[str, list[float]] = {k: [] for k in ("forward", "mode only", "sites, no secant arithmetic", "graph pass")}
    try:
        for r in range(rounds + 2):
            times = [forward()]
            SiteSession._on_activation = passthrough
            times.append(graph_pass())
            SiteSession._on_activation = real_site
            secant._output_and_slope, sites._small_site = no_arithmetic, short_no_arithmetic
            times.append(graph_pass())
            secant._output_and_slope, sites._small_site = real_slope, real_short
            times.append(graph_pass())
            if r >= 2:
                for k, t in zip(parts, times):
                    parts[k].append(t)
    finally:
        SiteSession._on_activation = real_site
        secant._output_and_slope, sites._small_site = real_slope, real_short
    return {k: statistics.median(v) * 1e3 for k, v in parts.items()}


def timing(methods: dict, rounds: int) -> dict[str, float]:
    for f in methods.values():  # warm up
        f()
        f()
    times = {k: [] for k in methods}
    for _ in range(rounds):
        for k, f in methods.items():
            start = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=0, help="timing rounds (default: 15 resnet18, 200 MLPs)")
    parser.add_argument("--cases", nargs="*", default=["resnet18", "model_b", "wide_tanh_mlp"])
    parser.add_argument("--breakdown", action="store_true",
                        help="instead: time each part of the averaged gradient next to its ordinary counterpart")
    parser.add_argument("--split", action="store_true",
                        help="instead: split the graph pass's excess over a forward (interception, sites, secant arithmetic)")
    args = parser.parse_args()
    cached = keep_freed_memory()
    print(f"# engine_cost — {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, freed memory kept by the C allocator: {cached}")
    print()
    table = None
    if args.split:
        table = ("| model | forward | graph pass, mode only | graph pass, no secant arithmetic | graph pass |", graph_split)
    elif args.breakdown:
        table = ("| model | no-grad forward | pass at `other` | forward | graph pass | ordinary backward | averaged backward |",
                 breakdown)
    if table is not None:
        head, parts = table
        print(head)
        print("|---" * head.count(" | ") + "|---|")
        for case in args.cases:
            model, closure, other, _ = build(case)
            b = parts(model, closure, other, args.rounds or (10 if case == "resnet18" else 60))
            print(f"| {case} | " + " | ".join(f"{v:.1f} ms" for v in b.values()) + " |", flush=True)
        return
    print("| model | ordinary fwd+bwd | cost-model floor | averaged / ordinary | Linear variant / ordinary | "
          "peak mem ordinary | averaged extra (allowed) | Linear extra (allowed) |")
    print("|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        rounds = args.rounds or (15 if case == "resnet18" else 200)
        model, closure, other, methods = build(case)
        t = timing(methods, rounds)
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        allowed = {
            "averaged": stored_bytes(model, closure, other, False) + param_bytes,
            "linear": stored_bytes(model, closure, other, True) + param_bytes,
        }
        mem = {method: peak_tensor_bytes(methods[method]) for method in ("ordinary", "averaged", "linear")}
        floor = (t["no-grad forward"] + t["ordinary"]) / t["ordinary"]
        mb = lambda b: f"{b / 2**20:.1f} MB"  # noqa: E731
        print(
            f"| {case} | {t['ordinary'] * 1e3:.1f} ms | {floor:.2f} | {t['averaged'] / t['ordinary']:.2f} | {t['linear'] / t['ordinary']:.2f} | "
            f"{mb(mem['ordinary'])} | {mb(mem['averaged'] - mem['ordinary'])} ({mb(allowed['averaged'])}) | "
            f"{mb(mem['linear'] - mem['ordinary'])} ({mb(allowed['linear'])}) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
