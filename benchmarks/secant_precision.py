"""Float32 precision of the closed-form secants against the generic quotient.

    python benchmarks/secant_precision.py

For LeakyReLU, ELU, SELU and CELU: the largest relative error of the registered closed-form
secant and of the generic quotient (f(ub) − f(ua)) / (ub − ua) with its close-inputs rule, on
5,000 float32 input pairs where the quotient cancels (steps of 0.5, 1e-3 and 1e-5, a fifth of the
inputs near −12), against an independent float64 formula — the data and the reference of
``tests/test_activations.py::test_piecewise_secants_keep_full_float32_precision``
(``tests/oracles.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from oracles import PIECEWISE_CASES, exact_piecewise_secant, hard_secant_inputs  # noqa: E402

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


if __name__ == "__main__":
    main()
