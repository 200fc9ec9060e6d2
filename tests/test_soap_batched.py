"""ttadapt's batched SOAP (ttadapt.optim.soap_batched) against pytorch-optimizer's own class: the
same parameters and every state tensor (moments, Kronecker factors, eigenbases) bit for bit over
steps that cross several refreshes, for each code path; the batches really taken; what it does
not batch left to the library; a step that would differ caught by the run-time check."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ttadapt
from ttadapt import kernels
from ttadapt.optim import soap_batched

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")


def _net() -> nn.Module:
    """Like Model B: a convolution, a wide layer, a stack of like-shaped layers, an odd one out."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 6 * 6, 10), nn.Tanh()]
    for _ in range(4):
        layers += [nn.Linear(10, 10), nn.Tanh()]
    layers += [nn.Linear(10, 7), nn.Tanh(), nn.Linear(7, 3)]
    return nn.Sequential(*layers)


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


OPTIONS = {
    "defaults": {},
    "no weight decay": {"weight_decay": 0.0},
    "no bias correction": {"correct_bias": False},
    "normalize_grads": {"normalize_grads": True},
    "precondition_1d": {"precondition_1d": True},
}


def _library(params, lr=1e-2, weight_decay=0.01, correct_bias=True, normalize_grads=False, precondition_1d=False):
    return pytorch_optimizer.SOAP(params, lr=lr, betas=(0.95, 0.95), weight_decay=weight_decay, precondition_frequency=4,
                                  merge_dims=False, correct_bias=correct_bias, normalize_gradient=normalize_grads,
                                  precondition_1d=precondition_1d)


def _pair(options: dict):
    a = _net()
    b = copy.deepcopy(a)
    ours = ttadapt.SOAP(a.parameters(), lr=1e-2, precondition_frequency=4, **options)
    return a, ours, b, _library(b.parameters(), **options)


def _run(model, opt, data, drop: int | None = None) -> None:
    for step, (x, y) in enumerate(data):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if drop is not None and step == drop:
            model[7].weight.grad = None  # one of the like-shaped layers sits a step out
        opt.step()


def _same(a, ours, b, lib) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True)) and all(
        soap_batched._state_equal(ours.state[p], lib.state[q]) for p, q in zip(a.parameters(), b.parameters()))


def _checked(opt) -> None:
    """The batched step's one-time check for the optimizer's groups (float32, CPU) done."""
    assert soap_batched._applies(opt)
    for group in opt.param_groups:
        assert soap_batched._holds(type(opt), group, torch.float32, torch.device("cpu"))


def _count(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls = {"matrix": 0, "vector": 0}
    for kind, name in (("matrix", "_matrices"), ("vector", "_vectors")):
        real = getattr(soap_batched, name)

        def counted(optimizer, group, rows, _real=real, _kind=kind):
            calls[_kind] += len(rows)
            return _real(optimizer, group, rows)

        monkeypatch.setattr(soap_batched, name, counted)
    return calls


@pytest.mark.parametrize("name", OPTIONS)
def test_bit_for_bit_the_library_across_refreshes(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    a, ours, b, lib = _pair(OPTIONS[name])
    assert type(ours).__name__ == "BatchedSOAP" and isinstance(ours, pytorch_optimizer.SOAP)
    _checked(ours)  # (its one-time check, which steps scratch optimizers, done before counting)
    calls = _count(monkeypatch)
    data = _batches(14)
    _run(a, ours, data, drop=6)
    _run(b, lib, data, drop=6)
    assert _same(a, ours, b, lib)
    products = soap_batched._products_agree((10, 10), 4, torch.float32, torch.device("cpu"))
    # the four 10 × 10 layers batched on every step after the first (one of them sat a step out);
    # the biases too, but not with normalize_grads (a mean per vector) or precondition_1d (projected)
    assert calls["matrix"] == (12 * 4 + 3 if products else 0)
    assert calls["vector"] == (0 if name in ("normalize_grads", "precondition_1d") else 13 * 8)


def test_closure_groups_and_a_state_dict_round_trip() -> None:
    a = _net()
    b = copy.deepcopy(a)
    split = lambda m: [{"params": list(m[:4].parameters())}, {"params": list(m[4:].parameters()), "lr": 3e-3}]  # noqa: E731
    ours = ttadapt.SOAP(split(a), lr=1e-2, precondition_frequency=4)
    lib = _library(split(b))
    data = _batches(12)
    for step, (x, y) in enumerate(data):
        for model, opt in ((a, ours), (b, lib)):
            def closure(model=model, opt=opt):
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            loss = opt.step(closure)
            assert loss is not None
        if step == 6:  # into a fresh batched optimizer from the library's checkpoint
            state = copy.deepcopy(lib.state_dict())
            ours = ttadapt.SOAP(split(a), lr=1e-2, precondition_frequency=4)
            ours.load_state_dict(state)
            a.load_state_dict(b.state_dict())
    assert _same(a, ours, b, lib)


def test_what_it_cannot_batch_is_the_librarys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Products that would round otherwise batched: those layers go through the library's loop."""
    monkeypatch.setattr(soap_batched, "_products_agree", lambda *args: False)
    a, ours, b, lib = _pair({})
    _checked(ours)
    calls = _count(monkeypatch)
    data = _batches(6)
    _run(a, ours, data)
    _run(b, lib, data)
    assert _same(a, ours, b, lib) and calls["matrix"] == 0 and calls["vector"] > 0


def test_a_step_that_differs_is_caught_once_and_the_library_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(soap_batched, "_HOLDS", {})
    real = soap_batched._hyper

    def off_by_a_bit(optimizer, group):  # a step size off by one part in a million
        k, w1, w2, step_size, keep = real(optimizer, group)
        return k, w1, w2, step_size * (1 + 1e-6), keep

    monkeypatch.setattr(soap_batched, "_hyper", off_by_a_bit)
    calls = _count(monkeypatch)
    a, ours, b, lib = _pair({})
    data = _batches(6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(a, ours, data)
    assert sum("batched SOAP step differs" in str(w.message) for w in caught) == 1
    _run(b, lib, data)
    assert _same(a, ours, b, lib)
    assert calls["matrix"] > 0  # (the check's scratch run, which found the difference), and no batch since
    before = dict(calls)
    _run(a, ours, data[:2])
    assert calls == before


def _conv_net() -> nn.Module:
    """Convolutions whose 3 × 3 and 1 × 1 kernel dimensions SOAP contracts over 4,608 columns."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 48, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(48, 96, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, 5))


def _conv_run(model, opt, steps: int) -> None:
    g = torch.Generator().manual_seed(4)
    for _ in range(steps):
        x, y = torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 5, (4,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _conv_runs_as_the_library(steps: int, **options) -> bool:
    """``ttadapt.SOAP`` and the library's class, each stepping its copy of :func:`_conv_net`:
    whether parameters and every state tensor end bit for bit equal."""
    a = _conv_net()
    b = copy.deepcopy(a)
    ours = ttadapt.SOAP(a.parameters(), lr=1e-2, precondition_frequency=4, **options)
    lib = _library(b.parameters(), **options)
    _conv_run(a, ours, steps)
    _conv_run(b, lib, steps)
    return _same(a, ours, b, lib)


def _spy_small_contract(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The shapes ``kernels.small_contract`` is called with from now on."""
    used: list[tuple[int, ...]] = []
    real = kernels.small_contract
    monkeypatch.setattr(kernels, "small_contract", lambda x, m: used.append(tuple(x.shape)) or real(x, m))
    return used


@pytest.mark.skipif(not kernels.available(), reason="no fused kernels here")
@pytest.mark.parametrize("name", ["defaults", "normalize_grads"])
def test_small_contractions_are_the_librarys(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The projections over a convolution kernel's small dimensions go through the kernel, bit
    for bit the library's tensordot over ten steps across two refreshes (parameters, moments,
    factors, eigenbases)."""
    used = _spy_small_contract(monkeypatch)
    assert _conv_runs_as_the_library(10, **OPTIONS[name])
    assert {(3, 3, 48, 32), (3, 48, 32, 3), (1, 1, 96, 48), (1, 96, 48, 1)} <= set(used)  # (and the checks' own calls)
    assert all(soap_batched._CONTRACTS[key] for key in soap_batched._CONTRACTS if key[1] == 4608)


@pytest.mark.skipif(not kernels.available(), reason="no fused kernels here")
def test_tensors_above_the_checks_memory_cap_keep_tensordot(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check per shape allocates three times the tensor: above ``_CONTRACT_MAX`` elements
    (here lowered to between the two convolutions' sizes) tensordot runs, bit for bit as ever."""
    monkeypatch.setattr(soap_batched, "_CONTRACT_MAX", 10_000)  # 1 × 1 conv: 4,608 elements; 3 × 3: 13,824
    used = _spy_small_contract(monkeypatch)
    assert _conv_runs_as_the_library(5)
    assert (1, 1, 96, 48) in used and not any(shape[0] == 3 for shape in used)


@pytest.mark.skipif(not kernels.available(), reason="no fused kernels here")
def test_a_projection_that_builds_a_graph_stays_tensordot() -> None:
    """``project`` called on a tensor that requires a gradient (outside the optimizer's step,
    which runs without one) keeps the library's differentiable tensordot."""
    model = _conv_net()
    opt = ttadapt.SOAP(model.parameters(), lr=1e-2, precondition_frequency=4)
    _conv_run(model, opt, 2)
    weight = model[2].weight  # 48 × 32 × 3 × 3
    state = opt.state[weight]
    x = torch.randn(weight.shape, requires_grad=True)
    got = opt.project(x, state)
    want = pytorch_optimizer.SOAP.project(opt, x.detach(), state)
    assert got.requires_grad and torch.equal(got.detach(), want)
    got.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    with torch.no_grad():  # (as in the step: the kernel, the same floats)
        assert torch.equal(opt.project(x, state), want)


@pytest.mark.skipif(not kernels.available(), reason="no fused kernels here")
def test_a_small_contraction_that_differs_is_left_to_tensordot(monkeypatch: pytest.MonkeyPatch) -> None:
    """A BLAS that sums such products otherwise (here: a kernel off by an ulp): the check per
    shape finds it, the library's tensordot runs, the steps are the library's."""
    monkeypatch.setattr(soap_batched, "_CONTRACTS", {})
    real = kernels.small_contract

    def off_by_an_ulp(x, m):
        out = real(x, m)
        return None if out is None else torch.nextafter(out, torch.full_like(out, math.inf))

    monkeypatch.setattr(kernels, "small_contract", off_by_an_ulp)
    assert _conv_runs_as_the_library(6)
    assert soap_batched._CONTRACTS and not any(soap_batched._CONTRACTS.values())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_step_as_the_library(dtype: torch.dtype) -> None:
    """float64 batches as float32 does; in bfloat16 ATen's elementwise operations round a
    tensor's tail otherwise batched, which the once-per-dtype check finds (a warning), and the
    library's loop steps them: bit for bit the library's either way."""
    a = _net().to(dtype)
    b = copy.deepcopy(a)
    ours = ttadapt.SOAP(a.parameters(), lr=1e-2, precondition_frequency=4)
    lib = _library(b.parameters())
    data = [(x.to(dtype), y) for x, y in _batches(9)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _run(a, ours, data)
    _run(b, lib, data)
    assert _same(a, ours, b, lib)


def test_pickles_and_unpickles_in_a_fresh_process(tmp_path) -> None:
    """The class is found by name (``torch.save`` of a whole optimizer, multiprocessing)."""
    import pickle
    import subprocess
    import sys

    model = _net()
    opt = ttadapt.SOAP(model.parameters(), lr=1e-2)
    _run(model, opt, _batches(2))
    path = tmp_path / "opt.pkl"
    path.write_bytes(pickle.dumps(opt))
    again = pickle.loads(path.read_bytes())
    assert type(again) is type(opt) and len(again.state) == len(opt.state)
    code = f"import pickle; opt = pickle.load(open({str(path)!r}, 'rb')); print(type(opt).__name__, len(opt.state))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["BatchedSOAP", str(len(opt.state))]


def test_recognised_under_another_package_name(tmp_path) -> None:
    """A copy of the package imported under another name (as benchmarks/ab_versions.py imports an
    older revision) still knows its batched SOAP as SOAP: swappable state, the closed-form dry
    step and the refresh skip apply to it."""
    import importlib
    import shutil
    import sys
    from pathlib import Path

    shutil.copytree(Path(ttadapt.__file__).parent, tmp_path / "ttadapt_copy", ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, str(tmp_path))
    try:
        other = importlib.import_module("ttadapt_copy")
        opt = other.create_optimizer("soap", _net().parameters(), 1e-3)
        assert type(opt).__module__ == "ttadapt_copy.optim.soap_batched"
        assert other.optim.snapshot.swappable(opt) and other.optim.soap_step._is_soap(opt)
        assert other.optim.refresh._targets(opt)
    finally:
        sys.path.remove(str(tmp_path))
        for name in [n for n in sys.modules if n == "ttadapt_copy" or n.startswith("ttadapt_copy.")]:
            del sys.modules[name]
