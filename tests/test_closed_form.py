"""The closed-form steps of ttadapt.optim.closed_form — AG-1/AG-2's fused forecast and AG-2's
dry step — against their oracle, the base optimizer's real ``step()``: over Adam's, AdamW's and
RMSprop's options, from an empty state and a warm one, at sizes that cross the kernels' chunk
and threading boundaries. Also: they write nothing where they do not apply, the dry step never
writes the optimizer state, the forecast is undone with the very tensors it kept and never
writes into one somebody else holds, and whole AG-1/AG-2 steps agree with the generic route."""

from __future__ import annotations

import copy

import pytest
import torch

import ttadapt
import ttadapt.optim.forward_looking as forward_looking
from ttadapt import kernels
from ttadapt.optim.closed_form import SpareState, dry_direction, fused_forecast
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


def _term_scale(opt: torch.optim.Optimizer, grad: torch.Tensor) -> torch.Tensor:
    """|θ″ − θ| of the optimizer's next step (from its state now, on a copy) with θ, the gradient
    and every state tensor replaced by their absolute values, in float64: the size of the terms
    the step adds up. Where they nearly cancel (a momentum buffer against the new gradient,
    β1·m against (1 − β1)·g), a float32 evaluation's rounding is relative to them, not to the
    result, and two correct evaluations — ATen's vectorised one (which fuses some multiply-adds
    on CPUs that have them) and the kernel's — may differ by more ulps of θ″ than two."""
    twin = copy.deepcopy(opt)
    q = twin.param_groups[0]["params"][0]
    state = twin.state.pop(q, {})
    q.data = q.data.abs().double()
    twin.state[q] = {k: v.abs().double() if torch.is_tensor(v) and v.is_floating_point() and k != "step" else v
                     for k, v in state.items()}
    start = q.detach().clone()
    maximize = twin.param_groups[0].get("maximize", False)  # (then the step negates the gradient: all terms add)
    q.grad = -grad.abs().double() if maximize else grad.abs().double()
    twin.step()
    return (q.detach() - start).abs()


def _within_ulps(got: torch.Tensor, want: torch.Tensor, theta: torch.Tensor, terms: torch.Tensor, ulps: float = 2.0) -> None:
    """θ″ − θ to a couple of float32 ulps of the larger of θ″ and the terms it sums (see
    :func:`_term_scale`; ATen's float sqrt is not always correctly rounded, the kernel's is; and
    θ″ − θ inherits θ″'s rounding)."""
    size = torch.maximum(theta.abs(), (theta + want).abs()).double() + terms
    bound = ulps * torch.finfo(torch.float32).eps * size + 1e-30
    excess = ((got - want).abs().double() - bound).max()
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
    terms = _term_scale(opt, grad)
    theta = p.detach().clone()
    forecast = theta + 1e-2 * torch.randn(n, generator=g)
    with torch.no_grad():
        p.copy_(forecast)
    lengths = dry_direction(opt, before, {"p": p}, {"p": theta}, {"p": grad})
    assert lengths is not None
    _within_ulps(p.detach(), want, theta, terms)
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
@pytest.mark.parametrize("method", ["AG1", "AG2"])
def test_wrapper_step_equals_the_generic_route(name, kw, method, monkeypatch):
    """One AG-1 / AG-2 step (from a warm state, with a frozen parameter and one without a
    gradient) by the closed forms and by the generic route (a snapshot, the real forecast step,
    the real dry step): the same parameters and optimizer state to float32 rounding (the square
    roots round differently now and then), the same forecast length; and the fused route kept
    no snapshot. (The state's tolerance is relative to each
    tensor's scale: a momentum buffer near cancellation amplifies the ulps the parameters
    differ by.)"""
    torch.manual_seed(3)
    base = _Net()
    x, y = torch.randn(64, 12), torch.randint(0, 4, (64,))

    def run():
        model = copy.deepcopy(base)
        opt = _optimizer(name, [p for p in model.parameters()], kw)
        wrapper = getattr(ttadapt, method)(model, opt)
        closure = lambda: torch.nn.functional.cross_entropy(model(x), y)  # noqa: E731
        for _ in range(2):  # a warm state: two ordinary steps (zero gradients where none, as the wrapper has it)
            opt.zero_grad()
            closure().backward()
            for p in model.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
            opt.step()
        wrapper.step(closure)
        return model, opt, wrapper

    fast_model, fast_opt, fast = run()
    assert not fast._spare_snapshots, "the fused forecast did not apply"
    calls = []
    monkeypatch.setattr(forward_looking, "dry_direction", lambda *a: calls.append(1))
    monkeypatch.setattr(forward_looking, "fused_forecast", lambda *a: calls.append(2))
    slow_model, slow_opt, slow = run()
    assert 2 in calls and (1 in calls or method == "AG1"), "the generic route was not taken"
    for (n, a), (_, b) in zip(fast_model.named_parameters(), slow_model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=4e-6, atol=1e-7, msg=n)
    assert fast.last_forecast_l1 == pytest.approx(slow.last_forecast_l1, rel=1e-5)
    assert len(fast_opt.state) == len(slow_opt.state)
    for a, b in zip(fast_opt.state.values(), slow_opt.state.values()):
        assert a.keys() == b.keys()
        for key in a:
            scale = float(b[key].abs().max())  # (near-cancelling entries of a momentum buffer: relative to the tensor)
            torch.testing.assert_close(a[key], b[key], rtol=4e-6, atol=4e-6 * scale + 1e-12, msg=key)


@pytest.mark.parametrize("name,kw", [CONFIGS[1], CONFIGS[-1]], ids=[IDS[1], IDS[-1]])
def test_ag2_with_the_fused_forecast_and_the_real_dry_step(name, kw, monkeypatch):
    """Where the dry step's closed form does not apply but the forecast's did, AG-2 puts the
    state before the forecast back, runs the real dry step from it and reinstates the committed
    state by copies: the same parameters and committed state as the fully generic route (to
    float32 rounding)."""
    torch.manual_seed(4)
    base = _Net()
    x, y = torch.randn(64, 12), torch.randint(0, 4, (64,))

    def run():
        model = copy.deepcopy(base)
        opt = _optimizer(name, list(model.parameters()), kw)
        wrapper = ttadapt.AG2(model, opt)
        closure = lambda: torch.nn.functional.cross_entropy(model(x), y)  # noqa: E731
        for _ in range(3):
            wrapper.step(closure)
        return model, opt

    real = forward_looking.fused_forecast
    applied = []
    monkeypatch.setattr(forward_looking, "fused_forecast", lambda *a: applied.append(real(*a)) or applied[-1])
    monkeypatch.setattr(forward_looking, "dry_direction", lambda *a: None)
    mixed_model, mixed_opt = run()
    assert [f is not None for f in applied] == [False, True, True]  # the first step builds the state
    monkeypatch.setattr(forward_looking, "fused_forecast", lambda *a: None)
    slow_model, slow_opt = run()
    for (n, a), (_, b) in zip(mixed_model.named_parameters(), slow_model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=4e-6, atol=1e-7, msg=n)
    # centered RMSprop with α = 0.3 divides by √(v − ḡ²), which nearly cancels three steps in:
    # the two routes' rounding (ATen's vectorised ops fuse multiply-adds on CPUs that have them,
    # the kernel does not) reaches the momentum buffer amplified, 4e-5 of its scale measured on
    # an AVX-512 machine (the parameters still agree to 4e-6)
    tolerance = 2e-4 if kw.get("centered") else 4e-6
    for a, b in zip(mixed_opt.state.values(), slow_opt.state.values()):
        for key in a:
            scale = float(b[key].abs().max())
            torch.testing.assert_close(a[key], b[key], rtol=4e-6, atol=tolerance * scale + 1e-12, msg=key)


# -- the fused forecast ------------------------------------------------------------------------
def _warm(name: str, kw: dict, n: int, seed: int) -> tuple[torch.nn.Parameter, torch.optim.Optimizer, torch.Generator]:
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(n, generator=g))
    opt = _optimizer(name, [p], kw)
    for _ in range(2):
        p.grad = torch.randn(n, generator=g)
        opt.step()
    p.grad = None
    return p, opt, g


@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
@pytest.mark.parametrize("n", [5, 1031, 300_001])
def test_fused_forecast_matches_the_real_step(name, kw, n):
    """θ′ and the state after it against the real step from the same state: θ′ to two ulps of the terms it sums (see _term_scale);
    the moments bit for bit where no square root feeds them (Adam's, RMSprop's averages), to two
    ulps of the larger term where one does (RMSprop's momentum buffer, buf·momentum + g/avg);
    the step count advanced."""
    p, opt, g = _warm(name, kw, n, seed=n)
    grad = torch.randn(n, generator=g)
    twin = copy.deepcopy(opt)  # the real step, on a copy of the parameter and state
    q = twin.param_groups[0]["params"][0]
    theta = p.detach().clone()
    q.grad = grad.clone()
    twin.step()
    terms = _term_scale(opt, grad)
    forecast = fused_forecast(opt, {"p": p}, {"p": grad}, SpareState())
    assert forecast is not None
    _within_ulps(p.detach() - theta, q.detach() - theta, theta, terms)
    mine, real = opt.state[p], twin.state[q]
    assert mine.keys() == real.keys()
    for key in mine:
        if key == "momentum_buffer":  # buf·momentum + g/avg: to two ulps of its larger term
            terms = real[key].abs() + 2 * kw["momentum"] * forecast.state_before[p][key].abs()
            bound = 2 * torch.finfo(torch.float32).eps * terms + 1e-30
            assert bool(((mine[key] - real[key]).abs() <= bound).all()), key
        else:
            assert torch.equal(mine[key], real[key]), key


def test_fused_forecast_counts_steps_of_any_dtype():
    """The step count advances by one whether the kernel counts it (float32, torch's default)
    or torch does (float64, under a float64 default dtype), and restore() puts it back."""
    for dtype in (torch.float32, torch.float64):
        p, opt, g = _warm("Adam", {}, 100, seed=4)
        opt.state[p]["step"] = torch.tensor(2.0, dtype=dtype)
        twin = copy.deepcopy(opt)
        q = twin.param_groups[0]["params"][0]
        theta = p.detach().clone()
        grad = torch.randn(100, generator=g)
        q.grad = grad.clone()
        twin.step()
        terms = _term_scale(opt, grad)
        forecast = fused_forecast(opt, {"p": p}, {"p": grad}, SpareState())
        assert forecast is not None
        assert opt.state[p]["step"].dtype == dtype and float(opt.state[p]["step"]) == 3.0
        _within_ulps(p.detach() - theta, q.detach() - theta, theta, terms)
        forecast.restore()
        assert float(opt.state[p]["step"]) == 2.0


@pytest.mark.parametrize("name,kw", [CONFIGS[1], CONFIGS[-1]], ids=[IDS[1], IDS[-1]])
def test_fused_forecast_restores_the_very_state_before(name, kw):
    """restore(): the optimizer holds the same tensor objects as before the forecast, with the
    same values, and the same step count; state_before showed them all along."""
    p, opt, g = _warm(name, kw, 3000, seed=1)
    objects = dict(opt.state[p])
    values = copy.deepcopy(opt.state[p])
    forecast = fused_forecast(opt, {"p": p}, {"p": torch.randn(3000, generator=g)}, SpareState())
    assert forecast is not None
    assert all(opt.state[p][k] is not objects[k] for k in objects if k != "step")
    assert forecast.state_before[p]["step"] == float(values["step"])
    for key in objects:
        if key != "step":
            assert forecast.state_before[p][key] is objects[key]
    forecast.restore()
    for key, value in values.items():
        assert opt.state[p][key] is objects[key], key
        assert torch.equal(opt.state[p][key], value), key


def test_fused_forecast_reuses_retired_memory_nobody_holds():
    """The second forecast writes into the tensors the first retired; a retired tensor the
    caller still holds (a state dict kept without cloning) is never written: new memory is
    taken instead."""
    p, opt, g = _warm("Adam", {}, 2000, seed=2)
    spares = SpareState()
    first = opt.state[p]["exp_avg"]
    first_ptr = first.data_ptr()
    del first
    assert fused_forecast(opt, {"p": p}, {"p": torch.randn(2000, generator=g)}, spares) is not None
    assert fused_forecast(opt, {"p": p}, {"p": torch.randn(2000, generator=g)}, spares) is not None
    assert opt.state[p]["exp_avg"].data_ptr() == first_ptr  # recycled
    held = opt.state_dict()["state"][0]["exp_avg"]  # a reference, as torch's state_dict() gives
    kept = held.clone()
    for _ in range(3):
        assert fused_forecast(opt, {"p": p}, {"p": torch.randn(2000, generator=g)}, spares) is not None
        assert torch.equal(held, kept)
        assert opt.state[p]["exp_avg"] is not held


def test_a_spare_the_kernel_refuses_is_not_taken_again():
    """A spare of the right shape but another dtype: the kernel declines (None, nothing written),
    the pool is emptied, and the next forecast takes new memory and applies."""
    p, opt, g = _warm("Adam", {}, 300, seed=6)
    spares = SpareState()
    spares.give(p, "exp_avg", torch.empty(300, dtype=torch.float64))
    value, saved = p.detach().clone(), copy.deepcopy(opt.state[p])
    grad = torch.randn(300, generator=g)
    assert fused_forecast(opt, {"p": p}, {"p": grad}, spares) is None
    assert torch.equal(p.detach(), value) and all(torch.equal(opt.state[p][k], v) for k, v in saved.items())
    assert fused_forecast(opt, {"p": p}, {"p": grad}, spares) is not None
    assert opt.state[p]["exp_avg"].dtype == torch.float32 and float(opt.state[p]["step"]) == float(saved["step"]) + 1


@pytest.mark.parametrize("case", ["sgd", "subclass", "float64", "hook", "capturable", "no kernels", "first step",
                                  "outside gradient"])
def test_fused_forecast_writes_nothing_where_it_does_not_apply(case, monkeypatch):
    """The real step runs instead (None), with parameters and state untouched: other optimizers,
    subclasses, other dtypes, step hooks, capturable, no kernels, no state yet (torch builds it),
    and a parameter the caller did not name that has a gradient (the real step would move it)."""
    dtype = torch.float64 if case == "float64" else torch.float32
    p = torch.nn.Parameter(torch.randn(50, dtype=dtype))
    extra = torch.nn.Parameter(torch.randn(5))
    make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9), "subclass": lambda ps: _MyAdam(ps, lr=1e-2)}
    opt = make.get(case, lambda ps: torch.optim.Adam(ps, lr=1e-2))([p, extra])
    if case != "first step":
        for _ in range(2):
            p.grad, extra.grad = torch.randn_like(p), torch.randn_like(extra)
            opt.step()
    p.grad, extra.grad = None, (torch.randn(5) if case == "outside gradient" else None)
    if case == "hook":
        opt.register_step_pre_hook(lambda *args: None)
    if case == "capturable":
        opt.param_groups[0]["capturable"] = True
    if case == "no kernels":
        monkeypatch.setitem(kernels._state, "lib", None)
    value = p.detach().clone()
    saved = copy.deepcopy(opt.state_dict())
    assert fused_forecast(opt, {"p": p}, {"p": torch.randn(50, dtype=dtype)}, SpareState()) is None
    assert torch.equal(p.detach(), value)
    now = opt.state_dict()
    for index, entry in saved["state"].items():
        for key, v in entry.items():
            assert torch.equal(now["state"][index][key], v), key
