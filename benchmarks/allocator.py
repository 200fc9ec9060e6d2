"""Steps with glibc's default allocator settings against ttadapt.keep_freed_memory().

    python benchmarks/allocator.py [--case resnet18] [--optimizer adam] [--steps 12] [--runs 3]

glibc settings stick to a process, so each run is a fresh process: default settings and
``keep_freed_memory()`` alternate, ``--runs`` of each. In each process the plain step (zero_grad,
forward, backward, step) and AG-3's (``d=45``) alternate for ``--steps`` rounds after three
warm-up rounds; a run reports each step's median time and median minor page faults (the pages
the kernel had to map and zero-fill: ``getrusage``), and AG-3 / plain as the median of the
rounds' ratios. See ``ttadapt/memory.py`` for why the faults happen.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(case: str, optimizer: str, steps: int, keep: bool) -> dict:
    if keep:
        from ttadapt.memory import keep_freed_memory

        kept = keep_freed_memory()
    else:
        kept = False
    import torch  # noqa: F401  (after the setting: nothing allocated before it)

    from _models import benchmark_case
    from step_cost import make_step

    model, x, y = benchmark_case(case)
    calls = {m: make_step(m, model, optimizer, x, y) for m in ("plain", "AG3")}
    times: dict[str, list[float]] = {m: [] for m in calls}
    faults: dict[str, list[int]] = {m: [] for m in calls}
    for r in range(steps + 3):
        for m, call in calls.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            call()
            t = time.perf_counter() - t0
            if r >= 3:
                times[m].append(t)
                faults[m].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return {"kept": kept,
            **{f"{m} ms": statistics.median(times[m]) * 1e3 for m in calls},
            **{f"{m} faults": statistics.median(faults[m]) for m in calls},
            "AG3 / plain": statistics.median(a / b for a, b in zip(times["AG3"], times["plain"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="resnet18")
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", choices=["default", "keep"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.case, args.optimizer, args.steps, args.child == "keep")))
        return
    import torch

    print(f"# allocator — {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.case}, {args.optimizer}, {args.steps} rounds per run")
    print()
    print("| run | glibc | plain step | its page faults | AG-3 step | its page faults | AG-3 / plain |")
    print("|---|---|---|---|---|---|---|")
    for run in range(args.runs):
        for setting in ("default", "keep"):
            done = subprocess.run([sys.executable, __file__, "--case", args.case, "--optimizer", args.optimizer,
                                   "--steps", str(args.steps), "--child", setting], capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"allocator: the {setting} run failed:\n{done.stderr.strip()}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            label = "keep_freed_memory()" if setting == "keep" else "default"
            if setting == "keep" and not r["kept"]:
                label += " (no effect here)"
            print(f"| {run + 1} | {label} | {r['plain ms']:.0f} ms | {r['plain faults']:,.0f} | {r['AG3 ms']:.0f} ms "
                  f"| {r['AG3 faults']:,.0f} | {r['AG3 / plain']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
