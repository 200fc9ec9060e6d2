"""One process, two versions of ttadapt: the working tree against a git revision, alternating.

    python benchmarks/ab_versions.py --base 43e6b73 [--case model_b] [--what AG1] [--rounds 80]

This machine's speed drifts by up to 8x for minutes, so two runs of ``step_cost.py`` cannot show
a change of a few per cent. Here the revision's ``ttadapt`` package is extracted with ``git
archive`` into a temporary directory and imported under another name (the package imports
itself relatively), each version gets its own copy of the same seeded model, and their calls
alternate (the order flipped every round); the medians are compared (and the means: they also
see costs that come once in many calls, such as a full garbage collection). ``--what``: a wrapper
(``AG1``, ``AG2``, ``AG3`` with ``d=--ag3-d``, default 1, ``SAM``) stepping Adam, ``engine`` (``averaged_grad``
towards a nearby state) or ``plain`` (zero_grad, forward, backward, Adam step: the same code in
both versions, so its ratio is the harness's own spread). ``--case``: a case of ``_models.py``
or ``tail`` (Model B's 27 tanh layers alone). glibc is told to keep freed memory (see ttadapt/memory.py).
Revisions from 2ba4d3f up to the one that added ``snapshot.BATCHED_SOAP_MODULE`` took their own
``ttadapt.SOAP`` for a foreign optimizer when imported under another name (a slower AG-1/AG-2
path): compare AG-1/AG-2 with ``--optimizer soap`` only against later revisions.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ttadapt.memory import keep_freed_memory  # noqa: E402
from _models import benchmark_case  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def import_revision(rev: str, into: Path):
    """The package ``ttadapt`` as of ``rev``, imported as ``ttadapt_at_<rev>``."""
    try:
        blob = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev, "ttadapt"],
                              capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"ab_versions: cannot read revision {rev!r} from git: {exc}") from None
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        try:
            tar.extractall(into, filter="data")
        except TypeError:  # Python < 3.10.12 / 3.11.4: no extraction filters (the archive is our own)
            tar.extractall(into)
    name = "ttadapt_at_" + "".join(c if c.isalnum() else "_" for c in rev)
    (into / "ttadapt").rename(into / name)
    sys.path.insert(0, str(into))
    return importlib.import_module(name)


def tail_case() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Model B's tanh stack alone: Linear(400, 10) + Tanh, 26 × (Linear(10, 10) + Tanh), Linear."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(400, 10), nn.Tanh()]
    for _ in range(26):
        layers += [nn.Linear(10, 10), nn.Tanh()]
    layers.append(nn.Linear(10, 10))
    return nn.Sequential(*layers).train(), torch.randn(128, 400), torch.randint(0, 10, (128,))


def make_call(lib, model: nn.Module, x: torch.Tensor, y: torch.Tensor, what: str, optimizer: str = "adam", ag3_d: int = 1):
    def closure():
        return F.cross_entropy(model(x), y)

    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    else:  # the project's factory (SOAP with the paper's settings, ...), from the package under test
        opt = lib.create_optimizer(optimizer, model.parameters(), 1e-4)
    if what == "plain":
        def call():
            opt.zero_grad()
            closure().backward()
            opt.step()
        return call
    if what == "engine":
        gen = torch.Generator().manual_seed(1)
        other = {n: p.detach() + 1e-3 * torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
        return lambda: lib.averaged_grad(model, closure, other)
    wrapper = lib.AG3(model, opt, d=ag3_d) if what == "AG3" else getattr(lib, what)(model, opt)
    return lambda: wrapper.step(closure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the git revision to compare the working tree with")
    parser.add_argument("--case", default="model_b")
    parser.add_argument("--what", default="AG1", choices=["AG1", "AG2", "AG3", "SAM", "engine", "plain"])
    parser.add_argument("--rounds", type=int, default=80)
    parser.add_argument("--optimizer", default="adam", help="adam (torch.optim.Adam), or a name for ttadapt.create_optimizer")
    parser.add_argument("--ag3-d", type=int, default=1, help="AG-3's anchor period (1: a new anchor every step)")
    args = parser.parse_args()
    keep_freed_memory()
    import ttadapt

    with tempfile.TemporaryDirectory() as tmp:
        base = import_revision(args.base, Path(tmp))
        model, x, y = tail_case() if args.case == "tail" else benchmark_case(args.case)
        calls = {"base": make_call(base, copy.deepcopy(model), x, y, args.what, args.optimizer, args.ag3_d),
                 "working tree": make_call(ttadapt, copy.deepcopy(model), x, y, args.what, args.optimizer, args.ag3_d)}
        times: dict[str, list[float]] = {k: [] for k in calls}
        for r in range(args.rounds + 3):
            for k in (list(calls) if r % 2 else list(calls)[::-1]):
                start = time.perf_counter()
                calls[k]()
                if r >= 3:
                    times[k].append(time.perf_counter() - start)
    b, w = (statistics.median(times[k]) * 1e3 for k in calls)
    bm, wm = (statistics.fmean(times[k]) * 1e3 for k in calls)
    paired = statistics.median(wt / bt for wt, bt in zip(times["working tree"], times["base"]))
    print(f"{args.case} {args.what}: {args.base} {b:.2f} ms, working tree {w:.2f} ms, "
          f"working tree / base {w / b:.3f} (medians of {args.rounds}); means {bm:.2f} and {wm:.2f} ms, {wm / bm:.3f}; "
          f"median of the rounds' ratios {paired:.3f}")


if __name__ == "__main__":
    main()
