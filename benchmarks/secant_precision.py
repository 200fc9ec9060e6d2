"""Float32 precision of the closed-form secants against the generic quotient.

    python benchmarks/secant_precision.py

For LeakyReLU, ELU, SELU, CELU and sigmoid: the largest relative error of the registered closed-form
secant and of the generic quotient (f(ub) − f(ua)) / (ub − ua) with its close-inputs rule, on
5,000 float32 input pairs where the quotient cancels (steps of 0.5, 1e-3 and 1e-5, a fifth of the
inputs near −12; for sigmoid also negated), against an independent float64 formula — the data
and the references of ``tests/test_activations.py`` (``tests/oracles.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from oracles import PIECEWISE_CASES, exact_piecewise_secant, exact_sigmoid_secant, hard_secant_inputs  # noqa: E402

import torch  # noqa: E402

from ttadapt.activations import registered_activations  # noqa: E402
from ttadapt.secant import secant_slope  # noqa: E402


def main() -> None:
    print("| activation | settings | closed form: max relative error | generic quotient: max relative error |")
    print("|---|---|---|---|")
    ua, ub = hard_secant_inputs()
    for name, settings, alpha, scale, kappa in PIECEWISE_CASES:
        act = registered_activations()[name]
        fn = lambda u: act.fn(u, **settings)  # noqa: E731
        closed = act.secant(ua, fn(ua), ub.clone(), **settings).double()
        generic = secant_slope(fn, lambda u: act.derivative(u, **settings), ua, fn(ua), ub.clone()).double()
        want = exact_piecewise_secant(act.fn, name, settings, alpha, scale, kappa, ua, ub)
        err = lambda got: ((got - want).abs() / want.abs()).max().item()  # noqa: E731
        print(f"| {name} | {settings or 'defaults'} | {err(closed):.1e} | {err(generic):.1e} |")
    act = registered_activations()["sigmoid"]  # inputs near +12 too: 1 − σ(u) saturates there
    ua, ub = torch.cat([ua, -ua]), torch.cat([ub, -ub])
    closed = act.secant(ua, torch.sigmoid(ua), ub.clone()).double()
    generic = secant_slope(torch.sigmoid, act.derivative, ua, torch.sigmoid(ua), ub.clone()).double()
    want = exact_sigmoid_secant(ua, ub)
    err = lambda got: ((got - want).abs() / want.abs()).max().item()  # noqa: E731
    print(f"| sigmoid | (and the inputs negated) | {err(closed):.1e} | {err(generic):.1e} |")


if __name__ == "__main__":
    main()
