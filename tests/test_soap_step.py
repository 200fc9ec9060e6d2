"""AG-2's dry step for pytorch-optimizer's SOAP from its state (ttadapt.optim.soap_step):
against the library's real step, the state only read, the real step kept where the formula
does not hold, and AG-2's invariants with it."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ttadapt
import ttadapt.optim.forward_looking as forward_looking
import ttadapt.optim.soap_step as soap_step
from ttadapt.optim.snapshot import OptimizerSnapshot

from test_optim import state_equal  # (the other tests' helpers, imported as oracles.py is)
from test_refresh import _tensors

pytest.importorskip("pytorch_optimizer")


def _params(gen: torch.Generator) -> dict[str, nn.Parameter]:
    """Every kind the closed form handles: matrices of one shape (a batch) and of others,
    vectors, a 4-D kernel, a matrix wider than a small ``max_precond_dim``."""
    shapes = {"a": (10, 10), "b": (10, 10), "c": (10, 10), "d": (7, 12), "bias1": (10,), "bias2": (7,),
              "kernel": (4, 3, 3, 3), "wide": (3, 40), "frozen": (5, 5), "no_grad": (6,)}
    return {n: nn.Parameter(torch.randn(s, generator=gen) * 0.3) for n, s in shapes.items()}


CONFIGS = {
    "paper defaults": {},
    "no weight decay": {"weight_decay": 0.0},
    "no bias correction": {"correct_bias": False},
    "normalized": {"normalize_grads": True},
    "1-D preconditioned": {"precondition_1d": True},
    "small max dim": {"max_precond_dim": 16},
}


def _batched_products_round_alike() -> bool:
    """Whether this platform's batched product of small column-major matrices gives the
    library's per-matrix ``tensordot`` floats (then the closed form is the step bit for bit)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 10, 10, generator=gen)
    q = torch.linalg.qr(torch.randn(3, 10, 10, generator=gen))[0]
    per = torch.stack([torch.tensordot(torch.tensordot(x[i], q[i], dims=[[0], [0]]), q[i], dims=[[0], [0]]) for i in range(3)])
    qs = torch.stack([m.mT for m in q.unbind(0)]).mT  # (each member column-major, as QR gives it)
    return torch.equal(per, torch.bmm(torch.bmm(x.mT, qs).mT, qs))


def _warm(opt, params: dict[str, nn.Parameter], gen: torch.Generator, steps: int) -> None:
    """``steps`` real steps of ``opt`` with random gradients (every eigendirection reached)."""
    for _ in range(steps):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def _dry_then_real(opt, params: dict[str, nn.Parameter], gen: torch.Generator) -> tuple[dict, dict]:
    """θ″ by ``soap_dry_step`` from a snapshot with random gradients, then the library's real
    step with the same gradients (the parameters then hold its θ″); returns (θ″ ours, θ)."""
    grads = {n: torch.randn(p.shape, generator=gen) for n, p in params.items()}
    theta = {n: p.detach().clone() for n, p in params.items()}
    new = soap_step.soap_dry_step(opt, OptimizerSnapshot(opt), params, theta, grads)
    for n, p in params.items():
        p.grad = grads[n]
    opt.step()
    return new, theta


@pytest.mark.parametrize("config", list(CONFIGS))
def test_closed_form_is_soaps_step(config: str) -> None:
    """θ″ from the snapshot against the library's real step from the same state, twelve steps
    in: bit for bit where batched products round as the library's (this project's machine; not
    with ``normalize_gradient``, whose mean sums in another order), else each tensor to 1e-3 of
    its step; the snapshot untouched; a parameter without gradient or outside ``params`` left
    alone."""
    gen = torch.Generator().manual_seed(3)
    params = _params(gen)
    opt = ttadapt.SOAP(list(params.values()), lr=3e-3, **CONFIGS[config])
    _warm(opt, params, gen, 12)
    grads = {n: torch.randn(p.shape, generator=gen) for n, p in params.items() if n != "no_grad"}
    theta = {n: p.detach().clone() for n, p in params.items()}
    before = OptimizerSnapshot(opt)
    saved = [t.clone() for s in before.parts[0][1].values() for t in _tensors(s)]
    ours = {n: p for n, p in params.items() if n != "frozen"}
    new = soap_step.soap_dry_step(opt, before, ours, theta, grads)
    assert new is not None and list(new) == list(ours)
    assert all(torch.equal(a, b) for a, b in zip(saved, [t for s in before.parts[0][1].values() for t in _tensors(s)]))
    for n, p in params.items():
        p.grad = grads.get(n)
    opt.step()
    assert torch.equal(new["no_grad"], params["no_grad"].detach())
    assert soap_step.agrees(new, ours, theta)
    if _batched_products_round_alike() and config != "normalized":
        assert all(torch.equal(new[n], p.detach()) for n, p in ours.items())


def test_groups_with_their_own_settings_and_odd_shapes() -> None:
    """Two parameter groups (learning rate and weight decay of their own), a 0-d parameter, a
    3-D one and a matrix over ``max_precond_dim``: θ″ as the library's step (bit for bit where
    batched products round alike)."""
    gen = torch.Generator().manual_seed(6)
    shapes = {"scalar": (), "cube": (3, 4, 2), "big": (20, 30), "m1": (5, 5), "v": (5,), "m2": (5, 5), "m3": (5, 5)}
    params = {n: nn.Parameter(torch.randn(s, generator=gen)) for n, s in shapes.items()}
    first = ["scalar", "cube", "big", "m1", "v"]
    opt = ttadapt.SOAP([{"params": [params[n] for n in first], "lr": 1e-2, "weight_decay": 0.1},
                        {"params": [params[n] for n in shapes if n not in first], "lr": 3e-3, "weight_decay": 0.0}],
                       max_precond_dim=16)
    _warm(opt, params, gen, 11)
    new, theta = _dry_then_real(opt, params, gen)
    assert new is not None and soap_step.agrees(new, params, theta)
    if _batched_products_round_alike():
        assert all(torch.equal(new[n], p.detach()) for n, p in params.items())


def test_a_wrong_formula_is_caught() -> None:
    """``agrees`` is the check the closed form must pass: θ″ off by 1 % of the step in one
    tensor fails it."""
    gen = torch.Generator().manual_seed(4)
    params = _params(gen)
    opt = ttadapt.SOAP(list(params.values()), lr=3e-3)
    _warm(opt, params, gen, 3)
    new, theta = _dry_then_real(opt, params, gen)
    assert soap_step.agrees(new, params, theta)
    new["d"] = theta["d"] + (new["d"] - theta["d"]) * 1.01
    assert not soap_step.agrees(new, params, theta)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 12), nn.Tanh(),
                         nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))


def _batches(n: int):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(n)]


def _count_steps(opt, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = type(opt).step

    def counted(self, *args, **kwargs):
        calls[0] += self is opt  # (not the scratch optimizer of the formula's check)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(opt), "step", counted)
    return calls


@pytest.mark.parametrize("linear", [False, True])
def test_ag2_with_soap_takes_one_real_step(linear: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """AG-2 (and AG-2 Linear) with SOAP: past SOAP's first step, one real step per AG-2 step
    (the forecast); the update's L1 length is the forecast's to 1e-6."""
    model = _model()
    opt = ttadapt.SOAP(model.parameters(), lr=1e-2, precondition_frequency=3)
    wrapper = ttadapt.AG2(model, opt, linear=linear)
    calls = _count_steps(opt, monkeypatch)
    for t, (x, y) in enumerate(_batches(8)):
        before = [p.detach().clone() for p in model.parameters()]
        calls[0] = 0
        wrapper.step(lambda: F.cross_entropy(model(x), y))
        moved = sum(float((p.detach() - b).abs().sum(dtype=torch.float64)) for p, b in zip(model.parameters(), before))
        if t >= 1:  # (the first dry step is SOAP's first step from an empty state: the real one)
            assert calls[0] == 1, t
            assert moved == pytest.approx(wrapper.last_forecast_l1, rel=1e-6)
    assert wrapper.skipped_steps == 0


def test_ag2_with_soap_follows_the_real_dry_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight AG-2 steps with SOAP from one start, with this module's dry step and with the real
    one: the same trajectory and optimizer state, bit for bit, where batched products round as
    the library's (this project's machine). Elsewhere the two differ by rounding, which SOAP's
    unreached eigendirections can amplify (module docstring): nothing to compare exactly."""
    if not _batched_products_round_alike():
        pytest.skip("this platform's batched matrix products round otherwise than per-matrix ones")
    data = _batches(8)
    runs = []
    for closed in (True, False):
        if not closed:
            monkeypatch.setattr(forward_looking, "soap_dry_step", lambda *args: None)
        model = _model()
        opt = ttadapt.SOAP(model.parameters(), lr=1e-2, precondition_frequency=3)
        wrapper = ttadapt.AG2(model, opt)
        losses = [float(wrapper.step(lambda: F.cross_entropy(model(x), y))) for x, y in data]
        runs.append((losses, [p.detach().clone() for p in model.parameters()], opt.state_dict()))
    (l1, p1, s1), (l2, p2, s2) = runs
    assert l1 == l2
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert state_equal(s1, s2)


def test_a_non_finite_averaged_gradient_leaves_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN in G′ on the closed-form route: the step is skipped, parameters and optimizer
    state bit for bit as before it."""
    model = _model()
    opt = ttadapt.SOAP(model.parameters(), lr=1e-2)
    wrapper = ttadapt.AG2(model, opt)
    data = _batches(4)
    for x, y in data[:3]:
        wrapper.step(lambda: F.cross_entropy(model(x), y))
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    real = forward_looking.DeferredAverage.averaged_grad

    def poisoned(self, *args, **kwargs):
        grads = real(self, *args, **kwargs)
        first = next(iter(grads))
        grads[first].view(-1)[0] = float("nan")
        return grads

    monkeypatch.setattr(forward_looking.DeferredAverage, "averaged_grad", poisoned)
    x, y = data[3]
    with pytest.warns(RuntimeWarning):
        wrapper.step(lambda: F.cross_entropy(model(x), y))
    assert wrapper.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert state_equal(opt.state_dict(), state)


def test_a_library_whose_step_differs_keeps_the_real_dry_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the library's SOAP computes otherwise than the closed form (here: its bias
    correction changed), the first check says so once, with a warning, and AG-2 runs the real
    dry step (two real steps per AG-2 step)."""
    from pytorch_optimizer.optimizer.soap import SOAP

    monkeypatch.setattr(soap_step, "_CHECKED", {})
    monkeypatch.setattr(SOAP, "debias", staticmethod(lambda beta, step: 1.0 - beta ** (step + 1)))
    model = _model()
    opt = ttadapt.SOAP(model.parameters(), lr=1e-2)
    wrapper = ttadapt.AG2(model, opt)
    calls = _count_steps(opt, monkeypatch)
    data = _batches(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in data:
            calls[0] = 0
            wrapper.step(lambda: F.cross_entropy(model(x), y))
            assert calls[0] == 2
    assert sum("differs from ttadapt's closed form" in str(w.message) for w in caught) == 1
