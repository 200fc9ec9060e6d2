"""AG-2's closed-form dry step (ttadapt.optim.closed_form) against its oracle, the base
optimizer's real ``step()`` (run by ``dry_run`` and undone): over Adam's, AdamW's and
RMSprop's options, from an empty state and a warm one, at sizes that cross the kernels' chunk
and threading boundaries. Also: it writes nothing where it does not apply, it never writes the
optimizer state, and whole AG-2 steps agree with the generic route."""

from __future__ import annotations

import copy

import pytest
import torch

import ttadapt
import ttadapt.optim.forward_looking as forward_looking
from ttadapt import kernels
from ttadapt.optim.closed_form import dry_direction
from ttadapt.optim.snapshot import OptimizerSnapshot, dry_run

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no fused kernels here: the closed form never applies")

CONFIGS = [
    ("Adam", {}),
    ("Adam", {"amsgrad": True, "weight_decay": 0.1}),
    ("Adam", {"maximize": True, "betas": (0.3, 0.8)}),  # β1 < 0.5: lerp's other branch
    ("Adam", {"lr": torch.tensor(3e-3)}),
    ("AdamW", {"weight_decay": 0.1}),
    ("AdamW", {"weight_decay": 0.05, "amsgrad": True, "maximize": True}),
    ("RMSprop", {}),
    ("RMSprop", {"centered": True}),
    ("RMSprop", {"momentum": 0.9, "weight_decay": 0.01}),
    ("RMSprop", {"centered": True, "momentum": 0.5, "maximize": True, "alpha": 0.3}),
]
IDS = [f"{name}-{'-'.join(k for k in kw) or 'defaults'}" for name, kw in CONFIGS]


def _optimizer(name: str, params, kw: dict) -> torch.optim.Optimizer:
    kw = dict(kw)
    lr = kw.pop("lr", 1e-3)
    return getattr(torch.optim, name)(params, lr=lr, **kw)


def _within_ulps(got: torch.Tensor, want: torch.Tensor, theta: torch.Tensor, ulps: float = 2.0) -> None:
    """θ″ − θ to a couple of float32 ulps of θ″ (ATen's float sqrt is not always correctly
    rounded, the kernel's is; and θ″ − θ inherits θ″'s rounding)."""
    bound = ulps * torch.finfo(torch.float32).eps * torch.maximum(theta.abs(), (theta + want).abs()) + 1e-30
    excess = ((got - want).abs() - bound).max()
    assert excess <= 0, f"off by more than {ulps} ulps: {float(excess)}"


@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
@pytest.mark.parametrize("n,warm", [(5, False), (1031, True), (300_001, True)])
def test_dry_direction_matches_the_real_step(name, kw, n, warm):
    g = torch.Generator().manual_seed(n)
    p = torch.nn.Parameter(torch.randn(n, generator=g))
    opt = _optimizer(name, [p], kw)
    if warm:
        for _ in range(2):
            p.grad = torch.randn(n, generator=g)
            opt.step()
    before = OptimizerSnapshot(opt)
    saved = copy.deepcopy(opt.state_dict())
    grad = torch.randn(n, generator=g)
    want = dry_run(opt, {p: grad})[p] - p.detach()
    theta = p.detach().clone()
    forecast = theta + 1e-2 * torch.randn(n, generator=g)
    with torch.no_grad():
        p.copy_(forecast)
    lengths = dry_direction(opt, before, {"p": p}, {"p": theta}, {"p": grad})
    assert lengths is not None
    _within_ulps(p.detach(), want, theta)
    forecast_l1 = float((forecast - theta).abs().double().sum())
    assert lengths[0] == pytest.approx(forecast_l1, rel=1e-6)
    assert lengths[1] == pytest.approx(float(want.abs().double().sum()), rel=1e-5)
    # the optimizer state and the snapshot were only read
    now = opt.state_dict()
    for key, value in saved["state"][0].items() if saved["state"] else []:
        assert torch.equal(now["state"][0][key], value), key
    for key, value in before.parts[0][1].get(p, {}).items():
        assert torch.equal(value, saved["state"][0][key]), key


def test_parameters_without_a_gradient_do_not_move():
    a, b = torch.nn.Parameter(torch.randn(40)), torch.nn.Parameter(torch.randn(7))
    opt = torch.optim.Adam([a, b], lr=1e-2)
    before = OptimizerSnapshot(opt)
    theta = {"a": a.detach().clone(), "b": b.detach().clone()}
    with torch.no_grad():
        a.add_(0.5)
        b.add_(0.25)
    lengths = dry_direction(opt, before, {"a": a, "b": b}, theta, {"a": torch.randn(40)})
    assert lengths is not None
    assert torch.equal(b.detach(), torch.zeros(7))  # θ″ − θ = 0: the step skips it
    assert lengths[0] == pytest.approx(40 * 0.5 + 7 * 0.25, rel=1e-6)


class _MyAdam(torch.optim.Adam):
    pass


@pytest.mark.parametrize("case", ["sgd", "subclass", "float64", "hook", "new option", "capturable", "no kernels"])
def test_where_it_does_not_apply_nothing_is_written(case, monkeypatch):
    dtype = torch.float64 if case == "float64" else torch.float32
    p = torch.nn.Parameter(torch.randn(50, dtype=dtype))
    if case == "sgd":
        opt = torch.optim.SGD([p], lr=1e-2, momentum=0.9)
    elif case == "subclass":
        opt = _MyAdam([p], lr=1e-2)
    elif case == "capturable":
        opt = torch.optim.Adam([p], lr=1e-2)
        opt.param_groups[0]["capturable"] = True
    else:
        opt = torch.optim.Adam([p], lr=1e-2)
    if case == "hook":
        opt.register_step_pre_hook(lambda *args: None)
    if case == "new option":
        opt.defaults["some_future_option"] = True
    if case == "no kernels":
        monkeypatch.setitem(kernels._state, "lib", None)
    before = OptimizerSnapshot(opt)
    value = p.detach().clone()
    assert dry_direction(opt, before, {"p": p}, {"p": value - 1}, {"p": torch.randn(50, dtype=dtype)}) is None
    assert torch.equal(p.detach(), value)


class _Net(torch.nn.Module):
    """A Tanh MLP with a frozen head and a layer the forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(12, 200), torch.nn.Tanh(), torch.nn.Linear(200, 4))
        self.unused = torch.nn.Linear(3, 3)
        self.frozen = torch.nn.Linear(4, 4).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(self.body(x))


@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_ag2_step_equals_the_generic_route(name, kw, monkeypatch):
    """One AG-2 step (from a warm state, with a frozen parameter and one without a gradient) by
    the closed form and by the real dry step: the same parameters to float32 rounding, the
    same forecast length, and the same optimizer state (the committed one) bit for bit."""
    torch.manual_seed(3)
    base = _Net()
    x, y = torch.randn(64, 12), torch.randint(0, 4, (64,))

    def run():
        model = copy.deepcopy(base)
        opt = _optimizer(name, [p for p in model.parameters()], kw)
        wrapper = ttadapt.AG2(model, opt)
        closure = lambda: torch.nn.functional.cross_entropy(model(x), y)  # noqa: E731
        for _ in range(2):  # a warm state: two ordinary steps
            opt.zero_grad()
            closure().backward()
            opt.step()
        wrapper.step(closure)
        return model, opt, wrapper

    fast_model, fast_opt, fast = run()
    calls = []
    monkeypatch.setattr(forward_looking, "dry_direction", lambda *a: calls.append(1))
    slow_model, slow_opt, slow = run()
    assert calls, "the generic route was not taken"
    for (n, a), (_, b) in zip(fast_model.named_parameters(), slow_model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7, msg=n)
    assert fast.last_forecast_l1 == pytest.approx(slow.last_forecast_l1, rel=1e-6)
    for a, b in zip(fast_opt.state.values(), slow_opt.state.values()):
        for key in a:
            assert torch.equal(a[key], b[key]), key
