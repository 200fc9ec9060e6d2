"""The activation registry: each derivative against autograd of its function, call forms, and
registering a user's own activation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ttadapt
from ttadapt.activations import CallForm, registered_activations, registered_module_activations

from oracles import PIECEWISE_CASES, exact_piecewise_secant, exact_sigmoid_secant, hard_secant_inputs

SETTINGS = {
    "leaky_relu": [{}, {"negative_slope": 0.3}],
    "elu": [{}, {"alpha": 0.5}],
    "celu": [{}, {"alpha": 2.0}],
    "gelu": [{}, {"approximate": "tanh"}],
    "softplus": [{}, {"beta": 3.0, "threshold": 5.0}],
    "hardtanh": [{}, {"min_val": -2.0, "max_val": 0.5}],
    "softshrink": [{}, {"lambd": 0.2}],
}


def _cases():
    for name, act in registered_activations().items():
        if act.parametric:
            continue
        for settings in SETTINGS.get(name, [{}]):
            yield pytest.param(name, settings, id=f"{name}-{settings}")


@pytest.mark.parametrize("name,settings", list(_cases()))
def test_derivative_matches_autograd(name, settings):
    act = registered_activations()[name]
    u = torch.linspace(-7, 7, 1001, dtype=torch.float64)
    kinks = torch.tensor(act.kinks(**settings), dtype=torch.float64)
    if len(kinks):  # the derivative is one-sided at a kink: stay clear of them
        u = u[(u[:, None] - kinks[None, :]).abs().min(1).values > 1e-6]
    x = u.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(act.fn(x, **settings).sum(), x)
    got = act.derivative(u, **settings)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name,settings", [c for c in _cases() if registered_activations()[c.values[0]].vjp is not None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vjp_is_autograds_backward_bit_for_bit(name, settings, dtype):
    """``vjp(g, u, f(u))`` — AG-1 / AG-2's ordinary backward — is plain autograd's, exactly."""
    act = registered_activations()[name]
    torch.manual_seed(0)
    u = torch.randn(3000, dtype=dtype) * 4
    g = torch.randn(3000, dtype=dtype)
    x = u.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(act.fn(x, **settings), x, g)
    assert torch.equal(act.vjp(g, u, act.fn(u, **settings), **settings), want)


def test_prelu_derivative():
    act = registered_activations()["prelu"]
    u = torch.randn(4, 3, 5, dtype=torch.float64)
    w = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    x = u.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(torch.prelu(x, w).sum(), x)
    torch.testing.assert_close(act.derivative(u, weight=w), want)


@pytest.mark.skipif(not registered_module_activations(), reason="transformers is not installed")
def test_module_activation_derivative_is_autograd_of_its_forward():
    for cls, entry in registered_module_activations().items():
        module = cls(-0.5, 3.0) if cls.__name__ == "ClippedGELUActivation" else (cls(dtype=torch.float64) if cls.__name__ == "XIELUActivation" else cls())
        u = torch.linspace(-3, 3, 101, dtype=torch.float64)
        x = u.clone().requires_grad_(True)
        (want,) = torch.autograd.grad(module(x).sum(), x)
        torch.testing.assert_close(entry.derivative(module, module.forward, u), want, msg=cls.__name__)


def test_call_forms_bind_positional_and_keyword_arguments():
    act = registered_activations()["leaky_relu"]
    form = next(f for f in act.forms if f.func is torch.nn.functional.leaky_relu)
    x = torch.zeros(1)
    assert form.bind((x, 0.2, True), {})[1:] == ({"negative_slope": 0.2}, True)
    assert form.bind((x,), {"negative_slope": 0.3})[1:] == ({"negative_slope": 0.3}, False)
    assert form.bind((), {"input": x, "inplace": True})[2] is True


def test_register_a_new_functional_activation():
    # A user's own elementwise op, dispatching through __torch_function__.
    def square_plus(u, b=4.0):
        if torch.overrides.has_torch_function_unary(u):
            return torch.overrides.handle_torch_function(square_plus, (u,), u, b=b)
        return (u + torch.sqrt(u * u + b)) / 2

    ttadapt.register_activation(
        "square_plus", fn=square_plus, deriv=None,
        forms=[CallForm(square_plus, settings=("b",))], defaults={"b": 4.0},
    )
    try:
        net = nn.Sequential(nn.Linear(3, 4)).double()

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, 2)

            def forward(self, x):
                return self.l2(square_plus(self.l1(x), b=2.0))

        net = Net().double()
        x = torch.randn(5, 3, dtype=torch.float64)
        c = torch.randn(5, 2, dtype=torch.float64)
        report = ttadapt.inspect(net, x)
        assert [s.call for s in report.averaged] == ["square_plus"]
        other = {"l1.weight": net.l1.weight.detach() + 0.5}
        closure = lambda: (c * net(x)).sum()  # noqa: E731
        got = ttadapt.averaged_grad(net, closure, other)
        ref = ttadapt.path_average_grad(net, closure, None, other, points=40)
        assert (got["l1.weight"] - ref["l1.weight"]).norm() < 1e-9 * ref["l1.weight"].norm()
    finally:
        ttadapt.unregister_activation("square_plus")
    assert "square_plus" not in registered_activations()


def test_register_a_module_activation():
    class Swish(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(2.0 * x)

    net = nn.Sequential(nn.Linear(3, 4), Swish(), nn.Linear(4, 2))
    report = ttadapt.inspect(net, torch.randn(2, 3))
    assert [s.call for s in report.averaged] == ["sigmoid"]  # only the inner sigmoid, op by op
    ttadapt.register_module_activation("swish2", Swish)
    try:
        report = ttadapt.inspect(net, torch.randn(2, 3))
        assert [(s.module, s.call) for s in report.averaged] == [("1", "swish2")]
    finally:
        ttadapt.unregister_activation(Swish)


def test_registering_a_taken_callable_is_refused():
    with pytest.raises(ValueError, match="already registered as 'relu'"):
        ttadapt.register_activation("my_relu", torch.relu, None, [CallForm(torch.relu)])
    with pytest.raises(TypeError):
        ttadapt.register_module_activation("x", int)


@pytest.mark.parametrize("name", [n for n, a in registered_activations().items() if a.secant is not None])
def test_closed_form_secants_match_the_quotient(name):
    act = registered_activations()[name]
    ua = torch.cat([torch.randn(2000) * 3, torch.tensor([-40.0, 40.0, 0.0, 1e-3])])
    ub = torch.cat([ua[:1000] + torch.randn(1000), ua[1000:2000] + 1e-6 * torch.randn(1000), torch.tensor([40.0, -40.0, 0.0, 1e-3])])
    got = act.secant(ua, act.fn(ua), ub)  # float32
    a64, b64 = ua.double(), ub.double()
    d = b64 - a64
    quotient = (act.fn(b64) - act.fn(a64)) / d
    want = torch.where(d.abs() < 1e-9, act.derivative(a64), quotient)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    same = act.secant(ua, act.fn(ua), ua.clone())
    assert torch.equal(same, act.derivative(ua)), "at ub == ua the slope is the derivative, bit for bit"


@pytest.mark.parametrize("name,settings,alpha,scale,kappa", PIECEWISE_CASES)
def test_piecewise_secants_keep_full_float32_precision(name, settings, alpha, scale, kappa):
    """ELU, SELU, CELU and LeakyReLU's closed forms against an independent float64 formula
    (:func:`oracles.exact_piecewise_secant`), where the plain quotient (f(ub) − f(ua))/(ub − ua)
    loses eps/|Δu|: saturated inputs, close inputs, both."""
    act = registered_activations()[name]
    ua, ub = hard_secant_inputs()
    got = act.secant(ua, act.fn(ua, **settings), ub.clone(), **settings).double()
    want = exact_piecewise_secant(act.fn, name, settings, alpha, scale, kappa, ua, ub)
    err = ((got - want).abs() / want.abs()).max().item()
    assert err < 1e-6, err
    # Large tensors are computed a block at a time (contiguous, permuted) or, laid out otherwise
    # (strided), in one go: elementwise, the same values (to a kernel's vectorised/scalar tail).
    big_a, big_b = ua.repeat(60).view(600, 500), ub.repeat(60).view(600, 500)  # 300,000 > one block
    for label, (la, lb) in {"contiguous": (big_a, big_b), "permuted": (big_a.T, big_b.T),
                            "strided": (big_a[:, ::2], big_b[:, ::2])}.items():
        for owned in (False, True):
            b_in = lb.clone() if owned else lb
            fb = act.fn(lb, **settings)
            slope = act.secant(la, act.fn(la, **settings), b_in, fb, owned, owned, **settings)
            want_big = got.float().repeat(60).view(600, 500)
            want_big = {"contiguous": want_big, "permuted": want_big.T, "strided": want_big[:, ::2]}[label]
            torch.testing.assert_close(slope, want_big, rtol=1e-6, atol=0, msg=lambda m: f"{label}, owned={owned}: {m}")
    # the generic quotient is far off here (the test can fail)
    from ttadapt.secant import secant_slope

    generic = secant_slope(lambda u: act.fn(u, **settings), lambda u: act.derivative(u, **settings), ua, act.fn(ua, **settings), ub.clone())
    generic_err = ((generic.double() - want).abs() / want.abs()).max().item()
    assert generic_err > 10 * err, (generic_err, err)


def test_sigmoid_secant_keeps_full_float32_precision():
    """Sigmoid's closed form against an independent float64 formula
    (:func:`oracles.exact_sigmoid_secant`) on the inputs where the quotient cancels, also in
    saturation (inputs near ±12); a block at a time for large tensors; the generic quotient is
    far off on the same data (the test can fail)."""
    from ttadapt.secant import secant_slope

    act = registered_activations()["sigmoid"]
    ua, ub = hard_secant_inputs()
    ua, ub = torch.cat([ua, -ua]), torch.cat([ub, -ub])
    want = exact_sigmoid_secant(ua, ub)
    got = act.secant(ua, torch.sigmoid(ua), ub.clone())
    err = ((got.double() - want).abs() / want.abs()).max().item()
    assert err < 1e-6, err
    generic = secant_slope(torch.sigmoid, act.derivative, ua, torch.sigmoid(ua), ub.clone()).double()
    assert ((generic - want).abs() / want.abs()).max().item() > 10 * err
    big_a, big_b = ua.repeat(30).view(600, 500), ub.repeat(30).view(600, 500)
    for owned in (False, True):
        b_in = big_b.clone() if owned else big_b
        slope = act.secant(big_a, torch.sigmoid(big_a), b_in, torch.sigmoid(big_b), owned, owned)
        torch.testing.assert_close(slope, got.repeat(30).view(600, 500), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["gelu", "silu", "softplus", "elu", "sigmoid", "mish"])
@pytest.mark.parametrize("close_share", [0.0, 0.01, 0.5])
def test_generic_secant_takes_the_derivative_exactly_where_inputs_are_close(name, close_share):
    """The division-by-zero rule of the generic secant, with none, a few or half of the units
    close: the derivative there, the float64 quotient (to float32 rounding) elsewhere."""
    from ttadapt.secant import secant_slope

    act = registered_activations()[name]
    torch.manual_seed(1)
    n = 4000
    ua = torch.randn(n) * 3
    ub = ua + torch.randn(n).sign() * (0.05 + torch.rand(n))
    close = torch.rand(n) < close_share
    ub[close] = ua[close] + torch.randn(int(close.sum())) * 1e-6  # |Δu| below sqrt(eps)·(1 + |u|)
    got = secant_slope(act.fn, act.derivative, ua, act.fn(ua), ub.clone())
    # (to rounding: a kernel's vectorised and scalar tails may differ in the last bit)
    torch.testing.assert_close(got[close], act.derivative(ua)[close], rtol=1e-6, atol=1e-7)
    a64, b64 = ua.double()[~close], ub.double()[~close]
    want = (act.fn(b64) - act.fn(a64)) / (b64 - a64)
    # float32 rounding of f(ua), f(ub) (GELU's float32 kernel: up to ~10 units) and of their
    # difference, amplified by 1/|Δu|
    bound = 16 * torch.finfo(torch.float32).eps * (act.fn(a64).abs() + act.fn(b64).abs() + 1) / (b64 - a64).abs()
    assert bool(((got[~close].double() - want).abs() <= bound).all())
