"""Exactness property (spec §2): for y = W2·f(W1·x + b1), a loss linear in y, and states that
differ only in W1, b1, the averaged gradient for W1, b1 IS the exact average gradient —
parametrized over every registered activation and every way of calling it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ttadapt
from ttadapt.activations import registered_activations, registered_module_activations

from conftest import rel_err
from oracles import exact_average_grad, split_points

# Settings that move each activation off its defaults (the defaults are covered by the module forms).
SETTINGS = {
    "leaky_relu": {"negative_slope": 0.2},
    "elu": {"alpha": 0.7},
    "celu": {"alpha": 0.6},
    "gelu": {"approximate": "tanh"},
    "softplus": {"beta": 2.0, "threshold": 20.0},
    "hardtanh": {"min_val": -0.5, "max_val": 0.8},
    "softshrink": {"lambd": 0.3},
}

# The nn.Module form of each activation (the module calls one of the functional forms).
MODULES = {
    "relu": lambda: nn.ReLU(),
    "relu6": lambda: nn.ReLU6(),
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "prelu": lambda: nn.PReLU(5),
    "elu": lambda: nn.ELU(),
    "selu": lambda: nn.SELU(),
    "celu": lambda: nn.CELU(1.3),
    "gelu": lambda: nn.GELU(),
    "silu": lambda: nn.SiLU(),
    "mish": lambda: nn.Mish(),
    "sigmoid": lambda: nn.Sigmoid(),
    "tanh": lambda: nn.Tanh(),
    "softplus": lambda: nn.Softplus(),
    "softsign": lambda: nn.Softsign(),
    "hardtanh": lambda: nn.Hardtanh(),
    "hardswish": lambda: nn.Hardswish(),
    "hardsigmoid": lambda: nn.Hardsigmoid(),
    "logsigmoid": lambda: nn.LogSigmoid(),
    "tanhshrink": lambda: nn.Tanhshrink(),
    "softshrink": lambda: nn.Softshrink(),
}


class Call(nn.Module):
    """Applies ``fn`` (a functional or in-place form) as the hidden activation."""

    def __init__(self, fn, settings=None, inplace=None):
        super().__init__()
        self.fn, self.settings, self.inplace = fn, dict(settings or {}), inplace

    def forward(self, u):
        if self.inplace is not None:
            return self.fn(u.clone(), **self.settings, inplace=self.inplace)
        if getattr(self.fn, "__name__", "").endswith("_"):  # always in place
            return self.fn(u.clone(), **self.settings)
        return self.fn(u, **self.settings)


class TwoLayer(nn.Module):
    def __init__(self, act: nn.Module, n_in=4, hidden=5, n_out=3):
        super().__init__()
        self.l1 = nn.Linear(n_in, hidden)
        self.act = act
        self.l2 = nn.Linear(hidden, n_out)

    def forward(self, x):
        return self.l2(self.act(self.l1(x)))


class PReLUCall(nn.Module):
    def __init__(self, fn, n=5):
        super().__init__()
        self.fn = fn
        self.weight = nn.Parameter(torch.full((n,), 0.3))

    def forward(self, u):
        return self.fn(u, self.weight)


def _check_exact(act_module: nn.Module, kinks, extra_params=(), scale=1.5, points=12):
    torch.manual_seed(1)
    net = TwoLayer(act_module).double()
    x = torch.randn(3, 4, dtype=torch.float64) * scale
    c = torch.randn(3, 3, dtype=torch.float64)

    def closure():
        return (c * net(x)).sum()

    other = {
        "l1.weight": net.l1.weight.detach() + 0.8 * torch.randn_like(net.l1.weight),
        "l1.bias": net.l1.bias.detach() + 0.8 * torch.randn_like(net.l1.bias),
    }
    with torch.no_grad():
        ua = net.l1(x)
        ub = F.linear(x, other["l1.weight"], other["l1.bias"])
    cuts = split_points(ua, ub, kinks)
    ref = exact_average_grad(net, closure, {}, other, cuts, points=points)
    got = ttadapt.averaged_grad(net, closure, other)
    for name in ("l1.weight", "l1.bias", *extra_params):
        assert rel_err(got[name], ref[name]) < 1e-6, (name, rel_err(got[name], ref[name]))
    # The ordinary gradient is a different thing: the test can fail.
    plain = torch.autograd.grad(closure(), [net.l1.weight])[0]
    assert rel_err(plain, ref["l1.weight"]) > 1e-3


def _forms():
    cases = []
    for name, act in registered_activations().items():
        if act.parametric:
            continue
        settings = SETTINGS.get(name, {})
        for form in act.forms:
            form_args = {k: v for k, v in settings.items() if k in form.settings}
            kinks = act.kinks(**form_args)
            label = f"{name}-{getattr(form.func, '__qualname__', form.func)}"
            if isinstance(form.inplace, str):
                cases.append(pytest.param(form.func, form_args, False, kinks, id=label))
                cases.append(pytest.param(form.func, form_args, True, kinks, id=label + "-inplace"))
            else:
                cases.append(pytest.param(form.func, form_args, None, kinks, id=label))
    return cases


@pytest.mark.parametrize("fn,args,inplace,kinks", _forms())
def test_functional_and_inplace_forms_are_exact(fn, args, inplace, kinks):
    _check_exact(Call(fn, args, inplace), kinks)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_forms_are_exact(name):
    act = registered_activations()[name]
    module = MODULES[name]()
    settings = {k: getattr(module, k) for k in act.defaults if hasattr(module, k)}
    if name == "leaky_relu":
        settings = {"negative_slope": module.negative_slope}
    if name == "celu":
        settings = {"alpha": module.alpha}
    kinks = act.kinks() if act.parametric else act.kinks(**settings)
    extra = ("act.weight",) if name == "prelu" else ()
    _check_exact(module, kinks, extra_params=extra)


def test_every_registered_activation_has_a_module_case():
    missing = set(registered_activations()) - set(MODULES)
    assert not missing, f"add module cases for {missing}"


def test_prelu_functional_exact_including_slope_gradient():
    # Only the input moves: the slope parameter's averaged gradient is exact too.
    _check_exact(PReLUCall(torch.prelu), (0.0,), extra_params=("act.weight",))


def _hf_cases():
    cases = []
    for cls, entry in registered_module_activations().items():
        cases.append(pytest.param(cls, id=cls.__name__))
    return cases


def _make_hf(cls):
    name = cls.__name__
    if name == "ClippedGELUActivation":
        return cls(-0.1, 0.9)
    if name == "XIELUActivation":
        return cls(dtype=torch.float64)
    return cls()


@pytest.mark.skipif(not registered_module_activations(), reason="transformers is not installed")
@pytest.mark.parametrize("cls", _hf_cases())
def test_transformers_activation_modules_are_exact(cls):
    module = _make_hf(cls)
    entry = registered_module_activations()[cls]
    _check_exact(module, entry.kinks(module))


def test_transformers_activations_are_all_registered():
    hf = pytest.importorskip("transformers.activations")
    import inspect as pyinspect

    classes = {
        obj for _, obj in vars(hf).items()
        if pyinspect.isclass(obj) and issubclass(obj, nn.Module) and obj.__module__ == hf.__name__
    }
    classes.discard(hf.LinearActivation)  # the identity: nothing to average
    missing = {c.__name__ for c in classes if c not in registered_module_activations()}
    assert not missing


def test_exact_in_float32():
    torch.manual_seed(2)
    net = TwoLayer(nn.Tanh())
    x = torch.randn(8, 4)
    c = torch.randn(8, 3)

    def closure():
        return (c * net(x)).sum()

    other = {"l1.weight": net.l1.weight.detach() + 0.5 * torch.randn_like(net.l1.weight)}
    got = ttadapt.averaged_grad(net, closure, other)
    net64 = TwoLayer(nn.Tanh()).double()
    net64.load_state_dict({k: v.double() for k, v in net.state_dict().items()})
    other64 = {k: v.double() for k, v in other.items()}
    ref = ttadapt.path_average_grad(net64, lambda: (c.double() * net64(x.double())).sum(), None, other64, points=48)
    assert rel_err(got["l1.weight"].double(), ref["l1.weight"]) < 1e-5
