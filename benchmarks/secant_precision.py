"""Float32 precision of the closed-form secants against the generic quotient.

    python benchmarks/secant_precision.py

For LeakyReLU, ELU, SELU and CELU: 5,000 float32 input pairs (steps of 0.5, 1e-3 and 1e-5, a
fifth of the inputs near −12), the largest relative error of the registered closed-form secant
and of the generic quotient (f(ub) − f(ua)) / (ub − ua) with its close-inputs rule, against an
independent float64 formula: both inputs negative, s·α·e^{κ·ua}·expm1(κ·Δu)/Δu (ν for
LeakyReLU); both positive, s; opposite signs, the float64 quotient (no cancellation there).
The same data as ``tests/test_activations.py::test_piecewise_secants_keep_full_float32_precision``.
"""

from __future__ import annotations

import torch

from ttadapt.activations import registered_activations
from ttadapt.secant import secant_slope

_SELU = (1.6732632423543772848170429916717, 1.0507009873554804934193349852946)
CASES = [
    ("elu", {}, 1.0, 1.0, 1.0),
    ("elu", {"alpha": 0.3}, 0.3, 1.0, 1.0),
    ("selu", {}, *_SELU, 1.0),
    ("celu", {"alpha": 0.5}, 0.5, 1.0, 2.0),
    ("celu", {"alpha": 2.0}, 2.0, 1.0, 0.5),
    ("leaky_relu", {"negative_slope": 0.01}, 0.0, 1.0, 1.0),
    ("leaky_relu", {"negative_slope": 0.2}, 0.0, 1.0, 1.0),
]


def main() -> None:
    print("| activation | settings | closed form: max relative error | generic quotient: max relative error |")
    print("|---|---|---|---|")
    for name, settings, alpha, scale, kappa in CASES:
        act = registered_activations()[name]
        torch.manual_seed(3)
        ua = torch.cat([torch.randn(3000) * 3, -12 + torch.randn(1000), torch.randn(1000)])
        step = torch.cat([torch.randn(3000) * 0.5, torch.randn(1000) * 1e-3, torch.randn(1000) * 1e-5])
        ub = ua + step
        ub[ub == ua] += 1e-3  # no exact ties: both take the derivative there
        fn = lambda u: act.fn(u, **settings)  # noqa: E731
        closed = act.secant(ua, fn(ua), ub.clone(), **settings).double()
        generic = secant_slope(fn, lambda u: act.derivative(u, **settings), ua, fn(ua), ub.clone()).double()
        a, b = ua.double(), ub.double()
        d = b - a
        if name == "leaky_relu":
            negative = torch.full_like(a, settings["negative_slope"])
        else:
            negative = scale * alpha * torch.exp(kappa * a) * torch.expm1(kappa * d) / d
        want = torch.where((a <= 0) & (b <= 0), negative,
                           torch.where((a > 0) & (b > 0), torch.full_like(a, scale), (fn(b) - fn(a)) / d))
        err = lambda got: ((got - want).abs() / want.abs()).max().item()  # noqa: E731
        print(f"| {name} | {settings or 'defaults'} | {err(closed):.1e} | {err(generic):.1e} |")


if __name__ == "__main__":
    main()
