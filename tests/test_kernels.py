"""The fused CPU kernels (ttadapt.kernels) against independent references: float64 formulas,
ATen's own derivative, and the PyTorch ops they replace (which must agree: the kernels change
speed, not results). Sizes cross the kernels' chunk (1,024 elements) and threading (16,384)
boundaries and leave ragged tails."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ttadapt
from ttadapt import kernels
from ttadapt.activations import _tanh_secant_torch
from ttadapt.rare import _fill_exact_ties
from ttadapt.optim.closed_form import dry_direction
from ttadapt.optim.snapshot import OptimizerSnapshot

needs_kernels = pytest.mark.skipif(kernels._compiler() is None, reason="no C compiler: the fused kernels cannot be built")

SIZES = [5, 1024 + 7, 300_001]  # a tail only; one chunk and a tail; threaded, with a tail


def _inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs close (|d| ~ 1e-4), apart (~0.3) and far (~3) in runs longer than a chunk, with
    ties, saturated inputs, signed zeros, infinities and NaNs sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    ua = torch.randn(n, generator=g) * 3
    scale = torch.tensor([1e-4, 0.3, 3.0]).repeat_interleave(2000).repeat(n // 6000 + 1)[:n]
    ub = ua + torch.randn(n, generator=g) * scale
    ub[::13] = ua[::13]
    ua[1::17], ub[1::17] = 12.0 + torch.rand(len(ua[1::17]), generator=g), -12.5
    if n > 40:
        ua[3], ub[3] = 0.0, -0.0
        ua[7], ub[9] = float("nan"), float("nan")
        ua[11], ub[19], ua[23], ub[23] = float("inf"), float("-inf"), float("inf"), float("inf")
    return ua, ub


def _exact_tanh_secant(ua: torch.Tensor, ub: torch.Tensor) -> torch.Tensor:
    """sinh(d)/(d·cosh a·cosh b) in float64 (tanh b − tanh a = sinh(b − a)/(cosh a cosh b)),
    1/cosh² a at d == 0: no cancellation anywhere (finite, moderate inputs)."""
    a, b = ua.double(), ub.double()
    d = b - a
    ratio = torch.where(d == 0, torch.ones_like(d), torch.sinh(d) / d)
    return ratio / (torch.cosh(a) * torch.cosh(b))


def _tanh_kernel(form: str, ua: torch.Tensor, fa: torch.Tensor, ub: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    """The kernel's slope in one of its three forms: ``fb`` read ("fb"), ``tanh(ub)`` formed in
    the kernel ("own"), or that times a gradient of ones ("grad")."""
    if form == "fb":
        got = kernels.tanh_secant(ua, fa, ub, fb)
    elif form == "own":
        got = kernels.tanh_secant(ua, fa, ub)
    else:
        got = kernels.tanh_secant(ua, fa, ub, grad=torch.ones_like(ua))
    assert got is not None
    return got


TANH_FORMS = ["fb", "own", "grad"]


@needs_kernels
@pytest.mark.parametrize("form", TANH_FORMS)
@pytest.mark.parametrize("n", SIZES)
def test_tanh_secant_kernel_matches_float64_and_the_torch_ops(n, form):
    ua, ub = _inputs(n)
    fa, fb = ua.tanh(), ub.tanh()
    got = _tanh_kernel(form, ua, fa, ub, fb)
    fallback = _tanh_secant_torch(ua, fa, ub.clone(), fb.clone())
    # where tanh saturates, 1 − fa·fb is a few ulps of 1 and the kernel's own tanh(ub) may
    # round to the other neighbour of ATen's: a difference of an ulp of 1 there
    atol = 1e-7 if form == "fb" else 2.4e-7
    torch.testing.assert_close(got, fallback, rtol=2e-6, atol=atol, equal_nan=True)
    finite = ua.isfinite() & ub.isfinite()
    want = _exact_tanh_secant(ua[finite], ub[finite])
    # float32 tanh(u) rounds to ±1 beyond |u| ≈ 9, so 1 − fa·fb is exact only to ~1 ulp of 1
    torch.testing.assert_close(got[finite].double(), want, rtol=1e-6, atol=2e-7)
    tie = ua == ub
    assert torch.equal(got[tie], torch.ops.aten.tanh_backward(torch.ones_like(fa[tie]), fa[tie])), "derivative bit for bit at ties"


@needs_kernels
@pytest.mark.parametrize("form", TANH_FORMS)
def test_tanh_secant_kernel_is_relatively_accurate_where_the_quotient_cancels(form):
    """Close, unsaturated inputs (the series path): full float32 relative precision, where the
    plain quotient (tanh b − tanh a)/(b − a) loses eps/|d|."""
    g = torch.Generator().manual_seed(1)
    # |u| ≤ 1: away from saturation, where 1 − fa·fb inherits float32 tanh's rounding of ±1
    ua = torch.rand(50_000, generator=g) * 2 - 1
    ub = ua + torch.randn(50_000, generator=g) * torch.tensor([1e-5, 1e-3, 0.2, 2.0]).repeat(12_500)
    got = _tanh_kernel(form, ua, ua.tanh(), ub, ub.tanh())
    want = _exact_tanh_secant(ua, ub)
    err = ((got.double() - want).abs() / want).max().item()
    quotient = (ub.tanh() - ua.tanh()) / (ub - ua)
    quotient_err = ((quotient.double() - want).abs() / want)[ub != ua].max().item()
    assert err < 1e-6 and quotient_err > 100 * err, (err, quotient_err)


@needs_kernels
@pytest.mark.parametrize("form", TANH_FORMS)
def test_tanh_secant_kernel_at_tied_infinities_among_close_inputs(form):
    """A chunk of close inputs (the series path) holding tied infinities (whose difference is
    NaN) and NaNs: the slope is the fallback's — 0 at ±inf tied, NaN where an input is NaN."""
    inf, nan = float("inf"), float("nan")
    ua = torch.tensor([inf, -inf, nan, 0.5, 0.3] + [0.1] * 30)
    ub = torch.tensor([inf, -inf, 0.5, nan, 0.3] + [0.1001] * 30)
    fa, fb = ua.tanh(), ub.tanh()
    got = _tanh_kernel(form, ua, fa, ub, fb)
    want = _tanh_secant_torch(ua, fa, ub.clone(), fb.clone())
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7, equal_nan=True)
    assert got[0] == 0 and got[1] == 0 and got[2].isnan() and got[3].isnan()


@needs_kernels
def test_tanh_secant_kernel_times_a_gradient_and_writes_over_its_inputs():
    """``grad ⊙ slope`` is the slope times the gradient to a rounding; ``out`` may be ``ub``
    (the engine's kept input) or the gradient itself."""
    ua, ub = _inputs(4099, seed=5)
    fa = ua.tanh()
    grad = torch.randn_like(ua)
    slope = kernels.tanh_secant(ua, fa, ub)
    want = grad * slope
    torch.testing.assert_close(kernels.tanh_secant(ua, fa, ub, grad=grad), want, rtol=1e-6, atol=0, equal_nan=True)
    into_grad = kernels.tanh_secant(ua, fa, ub, grad=grad.clone(), out=None)
    torch.testing.assert_close(into_grad, want, rtol=1e-6, atol=0, equal_nan=True)
    g2 = grad.clone()
    assert kernels.tanh_secant(ua, fa, ub, grad=g2, out=g2) is g2
    torch.testing.assert_close(g2, want, rtol=1e-6, atol=0, equal_nan=True)
    u2 = ub.clone()
    assert kernels.tanh_secant(ua, fa, u2, out=u2) is u2
    assert torch.equal(u2.nan_to_num(5.0), slope.nan_to_num(5.0))


@needs_kernels
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("lo,hi", [(0.0, math.inf), (0.0, 6.0), (-2.0, 0.5)])
def test_clamp_secant_kernel_is_the_exact_quotient_bit_for_bit(n, lo, hi):
    ua, ub = _inputs(n, seed=2)
    ua[::5] = ua[::5].clamp(-7, 7)  # many elements on both sides of both bounds
    # the derivative [lo < ua < hi] where the quotient is 0/0; an infinite bound is no bound
    # (ReLU's derivative is 1 at +inf), and a NaN input gets 0
    derivative = (ua > lo) & ((ua < hi) | (hi == math.inf))
    quotient = (ub.clamp(lo, hi) - ua.clamp(lo, hi)) / (ub - ua)
    want = torch.where(quotient.isnan(), derivative.float(), quotient)
    got = kernels.clamp_secant(ua, ub, lo, hi)
    assert torch.equal(got, want)
    # at finite ties, ATen's own backward of ReLU / ReLU6 / Hardtanh
    tie = (ua == ub) & ua.isfinite()
    ones = torch.ones_like(ua[tie])
    aten = (torch.ops.aten.threshold_backward(ones, ua[tie], 0.0) if hi == math.inf
            else torch.ops.aten.hardtanh_backward(ones, ua[tie], lo, hi))
    assert tie.sum() > 0 and torch.equal(got[tie], aten)
    # in place over ub (the engine's owned copy)
    b = ub.clone()
    assert kernels.clamp_secant(ua, b, lo, hi, out=b) is b and torch.equal(b, want)
    # the deferred backward's g ⊙ slope in the same pass
    grad = torch.randn(n)
    assert torch.equal(kernels.clamp_secant(ua, ub, lo, hi, grad=grad), grad * want)


@needs_kernels
def test_clamp_secant_kernel_equals_the_relu_fallback_of_the_engine():
    """The path the engine took before the kernel: (f(ub) − f(ua))/(ub − ua), then the
    derivative where that is NaN."""
    relu = ttadapt.registered_activations()["relu"]
    ua, ub = _inputs(300_001, seed=3)
    slope = (torch.relu(ub) - torch.relu(ua)) / (ub - ua)
    want = _fill_exact_ties(slope, torch.relu(ua), relu.derivative)
    assert torch.equal(kernels.clamp_secant(ua, ub, 0.0, math.inf), want)


@needs_kernels
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("alpha,scale,kappa", [(1.0, 1.0, 1.0), (1.6732632423543772, 1.0507009873554805, 1.0), (2.0, 1.0, 0.5)])
def test_exp_linear_secant_kernel_matches_float64_and_the_torch_ops(n, alpha, scale, kappa):
    """ELU, SELU, CELU (α = 2): against the PyTorch closed form it replaces (ties, NaN and
    infinities included) and against the float64 formula s·(f(ub) − f(ua))/(ub − ua)."""
    from ttadapt.activations import _exp_linear_secant, _exp_linear_secant_torch

    ua, ub = _inputs(n, seed=6)
    raw = kernels.exp_linear_secant(ua, ub, alpha, scale, kappa)
    assert raw is not None and bool(raw[ua == ub].isnan().all()), "0/0 where the inputs tie (the caller fills it)"
    got = _exp_linear_secant(ua, ub.clone(), True, None, False, alpha, scale, kappa)
    g = torch.randn(ua.shape, generator=torch.Generator().manual_seed(1))
    # with the gradient: g ⊙ slope in the same pass, the derivative at the ties taken by the kernel
    torch.testing.assert_close(kernels.exp_linear_secant(ua, ub, alpha, scale, kappa, grad=g), g * got, rtol=1e-6, atol=0,
                               equal_nan=True)
    want = _exp_linear_secant_torch(ua, ub.clone(), True, None, False, alpha, scale, kappa)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7, equal_nan=True)
    tie = ua == ub
    derivative = torch.ops.aten.elu_backward(torch.ones_like(ua[tie]), alpha, scale, kappa, False, ua[tie])
    # (to the last bit: ATen's vectorised and scalar paths may round e^u differently)
    torch.testing.assert_close(got[tie], derivative, rtol=1e-6, atol=0, msg="ATen's derivative at ties")
    far = ua.isfinite() & ub.isfinite() & ((ub - ua).abs() > 0.1)  # where float64's own quotient is exact enough
    a, b = ua[far].double(), ub[far].double()

    def f(u):
        return scale * (u.clamp(min=0) + alpha * torch.expm1(kappa * u.clamp(max=0)))

    torch.testing.assert_close(got[far].double(), (f(b) - f(a)) / (b - a), rtol=2e-6, atol=1e-7)
    assert kernels.exp_linear_secant(ua, ub, alpha, scale, -kappa) is None, "κ ≤ 0: the PyTorch ops"


@needs_kernels
@pytest.mark.parametrize("ties", [0, 3, 64, 65, 5000])
def test_exp_linear_kernel_reports_where_it_left_0_over_0(ties):
    """The kernel hands back the positions of its NaN slopes (ties, NaN inputs) when there are at
    most 64, so the engine puts the derivative there without another pass over the tensor; with
    more, it says so (None) and the general search runs. Either way the result is the same."""
    from ttadapt.activations import _exp_linear_secant

    g = torch.Generator().manual_seed(7)
    ua = torch.randn(3, 8, 26, 26, generator=g) * 2
    ub = ua + torch.randn(ua.shape, generator=g) * 0.01
    where = torch.randperm(ua.numel(), generator=g)[:ties]
    ub.view(-1)[where] = ua.view(-1)[where]
    if ties >= 3:
        ua.view(-1)[where[0]] = ub.view(-1)[where[0]] = float("nan")
    slope, positions = kernels.exp_linear_secant_ties(ua, ub, 1.0, 1.0, 1.0)
    if ties > 64:
        assert positions is None
    else:
        assert sorted(positions.tolist()) == sorted(where.tolist())
        assert bool(slope.view(-1)[where].isnan().all()) and int(slope.isnan().sum()) == ties
    got = _exp_linear_secant(ua, ub.clone(), True, None, False, 1.0, 1.0, 1.0)
    tie = (ua == ub) | ua.isnan()
    assert torch.equal(got[~tie], slope[~tie])
    derivative = torch.ops.aten.elu_backward(torch.ones_like(ua), 1.0, 1.0, 1.0, False, ua)
    torch.testing.assert_close(got[tie], derivative[tie], rtol=1e-6, atol=0, equal_nan=True)


def _ulps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got − want| in float32 ulps of ``want`` (both float32, same sign or zero)."""
    spacing = torch.nextafter(want.abs(), torch.tensor(math.inf)) - want.abs()
    return torch.where(got == want, 0.0, (got.double() - want.double()).abs() / spacing.double())


@needs_kernels
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("alpha, scale, kappa", [(1.0, 1.0, 1.0), (1.6732632423543772, 1.0507009873554805, 1.0),
                                                 (0.6, 1.0, 1.0 / 0.6), (2.5, 1.0, 0.4)])
def test_exp_linear_forward_kernel_against_float64(n, alpha, scale, kappa):
    """The ELU family's forward kernel (the pass at `other`): within two float32 ulps of the
    float64 value, rounded once, on random inputs of every magnitude and on the edge values;
    NaN stays NaN, −0.0 stays −0.0, and it agrees with ATen's to the same ulps."""
    g = torch.Generator().manual_seed(n)
    u = torch.randn(n, generator=g) * 10.0 ** torch.randint(-8, 3, (n,), generator=g).float()
    edges = torch.tensor([0.0, -0.0, float("nan"), float("inf"), float("-inf"), -1e-45, -1e-38, -0.34657, -0.34658,
                          -0.5, -1.0, -17.0, -88.0, -88.8, -104.0, -1e30, 3.0, 1e30])
    u[: min(n, len(edges))] = edges[: min(n, len(edges))]
    got = kernels.exp_linear(u, alpha, scale, kappa)
    assert got is not None and got.shape == u.shape
    neg = float(torch.tensor(alpha, dtype=torch.float32) * torch.tensor(scale, dtype=torch.float32))
    k32, s32 = float(torch.tensor(kappa, dtype=torch.float32)), float(torch.tensor(scale, dtype=torch.float32))
    u64 = u.double()
    want = torch.where(u64 >= 0, u64 * s32, torch.expm1((u * k32).double()) * neg).float()  # ATen's float products
    assert torch.equal(got.isnan(), u.isnan())
    ok = ~u.isnan()
    assert float(_ulps(got[ok], want[ok]).max()) <= 2.0
    assert torch.equal(torch.signbit(got[ok]), torch.signbit(want[ok]))
    aten = torch.ops.aten.elu(u, alpha, scale, kappa)
    assert float(_ulps(got[ok], aten[ok]).max()) <= 3.0
    assert kernels.exp_linear(u, alpha, scale, -kappa) is None, "κ ≤ 0: the PyTorch op"
    assert kernels.exp_linear(u.double(), alpha, scale, kappa) is None, "float64: the PyTorch op"


@needs_kernels
@pytest.mark.parametrize("n", SIZES)
def test_tanh_forward_kernel_against_float64(n):
    """The tanh forward kernel (the pass at `other`): within two float32 ulps of float64's tanh
    rounded once, odd, ±1 at ±∞ and beyond 9, NaN kept."""
    g = torch.Generator().manual_seed(n)
    u = torch.randn(n, generator=g) * 10.0 ** torch.randint(-8, 2, (n,), generator=g).float()
    edges = torch.tensor([0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e-45, 0.5499, 0.55, 0.5501, 8.99, 9.01, -30.0])
    u[: min(n, len(edges))] = edges[: min(n, len(edges))]
    got = kernels.tanh(u)
    assert got is not None
    want = torch.tanh(u.double()).float()
    assert torch.equal(got.isnan(), u.isnan())
    ok = ~u.isnan()
    assert float(_ulps(got[ok].abs(), want[ok].abs()).max()) <= 2.0
    assert torch.equal(torch.signbit(got[ok]), torch.signbit(want[ok]))
    assert torch.equal(kernels.tanh(-u[ok]), -got[ok]), "odd"
    assert kernels.tanh(u.double()) is None


@needs_kernels
def test_exp_linear_forward_kernel_keeps_a_channels_last_layout():
    u = torch.randn(4, 6, 9, 9).to(memory_format=torch.channels_last)
    got = kernels.exp_linear(u, 1.0, 1.0, 1.0)
    assert got is not None and got.stride() == u.stride()
    torch.testing.assert_close(got, torch.nn.functional.elu(u), rtol=3e-7, atol=0)


def _theta_and_step(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, float, torch.Generator]:
    """θ, a point 1e-3 away and their L1 distance in float64."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(n, generator=g)
    moved = theta + 1e-3 * torch.randn(n, generator=g)
    return theta, moved, float((moved - theta).abs().double().sum()), g


@needs_kernels
@pytest.mark.parametrize("n", SIZES)
def test_ag1_update_kernel_matches_the_formula(n):
    theta, forecast, want_l1, g = _theta_and_step(n, 4)
    grad = torch.randn(n, generator=g)
    grad[::3] = 0.0  # sign 0: the coordinate keeps θ
    grad[1::7] = -0.0
    want = theta - (forecast - theta).abs() * grad.sign()
    p = forecast.clone()
    l1 = kernels.ag1_update(p, theta, grad)
    assert torch.equal(p, want)
    assert abs(l1 - want_l1) <= 1e-6 * want_l1
    assert p._version > 0, "autograd sees the in-place write"


@needs_kernels
def test_ag1_update_of_many_tensors_in_one_call_matches_one_call_each():
    """ag1_update_many: the same parameters bit for bit and the summed L1 length, across sizes
    on both sides of the threading threshold; None, nothing written, if one triple does not fit."""
    triples = [_theta_and_step(n, 10 + n) for n in SIZES]
    grads = [torch.randn(t[0].shape, generator=t[3]) for t in triples]
    one_each = [t[1].clone() for t in triples]
    want = sum(kernels.ag1_update(p, t[0], g) for p, t, g in zip(one_each, triples, grads))
    many = [t[1].clone() for t in triples]
    got = kernels.ag1_update_many(many, [t[0] for t in triples], grads)
    assert all(torch.equal(a, b) for a, b in zip(many, one_each))
    assert got == pytest.approx(want, rel=1e-12)
    assert all(p._version > 0 for p in many)
    again = [t[1].clone() for t in triples]
    assert kernels.ag1_update_many(again, [t[0] for t in triples[:-1]] + [triples[-1][0].double()], grads) is None
    assert all(torch.equal(p, t[1]) for p, t in zip(again, triples))


@needs_kernels
@pytest.mark.parametrize("n", SIZES)
def test_ag2_kernels_match_the_formulas(n):
    theta, dry, want_l1, _ = _theta_and_step(n, 7)
    assert abs(kernels.l1_diff(dry, theta) - want_l1) <= 1e-6 * want_l1
    p = dry.clone()
    assert kernels.ag2_rescale(p, theta, 0.37)
    torch.testing.assert_close(p, theta + 0.37 * (dry - theta), rtol=0, atol=2 * torch.finfo(torch.float32).eps * 4)


@needs_kernels
def test_step_lengths_are_summed_without_drift():
    """Millions of like-sized steps (Adam's first step is about lr everywhere): a float32 running
    sum of them drifts by ~1e-6 of itself, since its roundings do not average out. The L1 lengths
    of the AG-1 update, AG-2's lengths and the closed-form dry step agree with a float64 sum of
    the same float32 differences to 1e-9."""
    g = torch.Generator().manual_seed(5)
    n = 3_000_001
    theta = (torch.rand(n, generator=g) - 0.5) * 0.036
    p = theta + 1e-3 * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    want = float((p - theta).abs().double().sum())
    assert kernels.l1_diff(p, theta) == pytest.approx(want, rel=1e-9)
    assert kernels.ag1_update(p.clone(), theta, torch.randn(n, generator=g)) == pytest.approx(want, rel=1e-9)
    q = torch.nn.Parameter(theta.clone())
    opt = torch.optim.Adam([q], lr=1e-3)
    q.grad = torch.randn(n, generator=g)
    opt.step()  # a state for the dry step
    start = q.detach().clone()
    with torch.no_grad():
        q.copy_(p)
    lengths = dry_direction(opt, OptimizerSnapshot(opt), {"q": q}, {"q": start}, {"q": torch.randn(n, generator=g)})
    assert lengths is not None
    assert lengths[0] == pytest.approx(float((p - start).abs().double().sum()), rel=1e-9)
    assert lengths[1] == pytest.approx(float(q.detach().abs().double().sum()), rel=1e-9)  # q holds θ″ − θ


@needs_kernels
def test_ag2_commit_of_many_tensors_matches_torch_add():
    """ag2_commit_many (p holding θ″ − θ): θ + scale·(θ″ − θ) as torch.add(θ, p, alpha=scale) to
    an ulp (one rounding either way), all sizes in one call; False, nothing written, if one pair
    does not fit."""
    pairs = [_theta_and_step(n, 20 + n) for n in SIZES]
    steps = [(t[1] - t[0]) for t in pairs]
    want = [torch.add(t[0], d, alpha=0.37) for t, d in zip(pairs, steps)]
    got = [d.clone() for d in steps]
    assert kernels.ag2_commit_many(got, [t[0] for t in pairs], 0.37)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=torch.finfo(torch.float32).eps, atol=1e-30)
    again = [d.clone() for d in steps]
    assert not kernels.ag2_commit_many(again, [t[0] for t in pairs[:-1]] + [pairs[-1][0].double()], 0.37)
    assert all(torch.equal(a, d) for a, d in zip(again, steps))


@needs_kernels
def test_l1_lengths_and_rescale_of_many_tensors_match_one_call_each():
    """l1_diff_many: the pairs' sums as l1_diff forms each, added in double in order — the same
    float as the per-tensor calls, within 1e-9 of a float64 sum; ag2_rescale_many (p holding
    θ″): the same bits as ag2_rescale per tensor. Neither applies (None / False, nothing written)
    where one pair does not fit."""
    pairs = [_theta_and_step(n, 40 + n) for n in SIZES]
    thetas, dries = [t[0] for t in pairs], [t[1] for t in pairs]
    total = 0.0
    for d, t in zip(dries, thetas):
        total += kernels.l1_diff(d, t)
    assert kernels.l1_diff_many(dries, thetas) == total
    assert total == pytest.approx(sum(float((d - t).abs().double().sum()) for d, t in zip(dries, thetas)), rel=1e-9)
    got = [d.clone() for d in dries]
    assert kernels.ag2_rescale_many(got, thetas, 0.37)
    for g, d, t in zip(got, dries, thetas):
        one = d.clone()
        assert kernels.ag2_rescale(one, t, 0.37) and torch.equal(g, one)
    misfit = thetas[:-1] + [thetas[-1].double()]
    assert kernels.l1_diff_many(dries, misfit) is None
    again = [d.clone() for d in dries]
    assert not kernels.ag2_rescale_many(again, misfit, 0.37)
    assert all(torch.equal(a, d) for a, d in zip(again, dries))
    assert kernels.l1_diff_many([], []) == 0.0


@needs_kernels
def test_finite_check_of_many_tensors_matches_isfinite():
    """One read-only call over many tensors: True exactly where ``torch.isfinite`` holds for every
    element (finite values near float32's maximum included: nothing is summed that could
    overflow), None where a tensor is not float32, dense and non-empty; the tensors'
    versions are left alone."""
    g = torch.Generator().manual_seed(0)
    big = torch.finfo(torch.float32).max
    base = [torch.randn(n, generator=g) for n in (1, 7, 1000, 4099)] + [torch.tensor(2.0), torch.full((300,), big)]
    base.append(torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last))
    versions = [t._version for t in base]
    assert kernels.all_finite_many(base) is True
    assert [t._version for t in base] == versions
    for bad in (float("nan"), float("inf"), -float("inf")):
        for k in range(len(base)):
            tensors = [t.clone() for t in base]
            tensors[k][tuple(n - 1 for n in tensors[k].shape)] = bad  # the last element (any layout)
            assert kernels.all_finite_many(tensors) is False
    assert kernels.all_finite_many([base[0], base[1].double()]) is None
    assert kernels.all_finite_many([base[0], torch.empty(0)]) is None
    assert kernels.all_finite_many([torch.randn(4, 4)[:, ::2]]) is None


def _ordered_sums(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``tensordot(x, m, dims=[[0], [0]])`` summed in order, every product and sum rounded."""
    a = x.reshape(x.shape[0], -1)
    columns = []
    for j in range(m.shape[1]):
        c = a[0] * m[0, j]
        for k in range(1, m.shape[0]):
            c = c + a[k] * m[k, j]
        columns.append(c)
    return torch.stack(columns, dim=-1).view(*x.shape[1:], m.shape[1])


@needs_kernels
@pytest.mark.parametrize("n, p", [(1, 1), (3, 3), (2, 5), (8, 8), (5, 1)])
@pytest.mark.parametrize("count", [7, 256 + 3, 40_001])
def test_small_contraction_sums_in_order(n, p, count):
    """SOAP's projection over a small leading dimension (optim.soap_batched._contract): each
    element the products summed in order, every operation rounded — bit for bit the PyTorch
    ops that do so (one block's tail, several blocks, threaded), non-finite values propagating."""
    g = torch.Generator().manual_seed(n * 100 + p)
    x = torch.randn(n, count, generator=g) * 10.0 ** torch.randint(-3, 4, (n, count), generator=g)
    x[0, 1] = float("nan")
    x[-1, 2] = float("inf")
    m = torch.randn(n, p, generator=g)
    got = kernels.small_contract(x, m)
    assert got is not None and got.shape == (count, p) and got.is_contiguous()
    want = _ordered_sums(x, m)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))
    shaped = torch.randn(n, 3, count, generator=g)  # trailing dimensions kept, as tensordot's result has them
    assert torch.equal(kernels.small_contract(shaped, m.T.contiguous().T if p == n else m), _ordered_sums(shaped, m))


@needs_kernels
def test_small_contraction_declines_what_it_does_not_cover():
    x, m = torch.randn(3, 50), torch.randn(3, 3)
    assert kernels.small_contract(x.double(), m.double()) is None  # float64: tensordot
    assert kernels.small_contract(x.T.contiguous().T, m) is None  # not contiguous
    assert kernels.small_contract(x, torch.randn(2, 3)) is None  # m's rows are not x's leading dimension
    assert kernels.small_contract(torch.randn(9, 50), torch.randn(9, 9)) is None  # wider than SMALL_CONTRACT_MAX
    assert kernels.small_contract(torch.empty(3, 0), m) is None


@needs_kernels
@needs_kernels
@pytest.mark.parametrize("n", SIZES)
def test_sigmoid_secant_kernel_matches_float64_and_the_torch_form(n):
    """Within 1e-6 of float64's (σa·σ(−b) + σb·σ(−a))·tanh(d/2)/d where the inputs differ (in
    saturation too, where the plain quotient loses everything); ATen's derivative bit for bit at
    ties, and the PyTorch form's result wherever an input is not finite."""
    from ttadapt.activations import _sigmoid_secant_torch

    ua, ub = _inputs(n)
    fa, fb = ua.sigmoid(), ub.sigmoid()
    got = kernels.sigmoid_secant(ua, fa, ub, fb)
    want = _sigmoid_secant_torch(ua, fa, ub.clone(), fb.clone())
    a, b = ua.double(), ub.double()
    exact = (torch.sigmoid(a) * torch.sigmoid(-b) + torch.sigmoid(b) * torch.sigmoid(-a)) * torch.tanh((b - a) / 2) / (b - a)
    finite = torch.isfinite(ua) & torch.isfinite(ub)
    apart = finite & (ua != ub)
    assert float(((got.double() - exact).abs() / exact.abs())[apart].max()) < 1e-6
    assert torch.equal(got[finite & (ua == ub)], want[finite & (ua == ub)])
    assert _same(got[~finite], want[~finite])
    out = fb.clone()
    assert kernels.sigmoid_secant(ua, fa, ub, out, out=out) is out and _same(out, got)  # over fb


def _too_close(ua: torch.Tensor, ub: torch.Tensor, tol: float) -> torch.Tensor:
    """The PyTorch fallback's division-by-zero test (ttadapt.secant.close_mask)."""
    from ttadapt.secant import close_mask

    return close_mask(ua, ub - ua)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


@needs_kernels
@pytest.mark.parametrize("n", SIZES)
def test_quotient_secant_kernel_is_the_torch_quotient_and_finds_the_close_inputs(n):
    ua, ub = _inputs(n)
    fa, fb = torch.nn.functional.silu(ua), torch.nn.functional.silu(ub)
    tol = torch.finfo(torch.float32).eps ** 0.5
    near = _too_close(ua, ub, tol)
    got = kernels._quotient_secant(ua, fa, ub, fb, tol, None, n)  # room for every position
    assert got is not None and _same(got[0], (fb - fa) / (ub - ua))
    assert torch.equal(got[1].sort().values, near.nonzero().squeeze(1))
    slope, positions = kernels.quotient_secant(ua, fa, ub, fb, tol, out=fb.clone())
    assert (positions is None) == (int(near.sum()) > kernels.close_cap(n))
    derivative = torch.ops.aten.silu_backward(torch.ones_like(ua), ua)
    assert kernels.close_fill(ua, ub, derivative, tol, slope)
    assert _same(slope, torch.where(near, derivative, (fb - fa) / (ub - ua)))


@needs_kernels
@pytest.mark.parametrize("count", [0, 1, 256, 257, 9_000, 18_751, 40_000])
def test_quotient_secant_kernel_reports_close_inputs_across_chunks_and_threads(count):
    """Close inputs spread over many chunks (each reserves its slots at once): every position is
    reported up to the cap (one in 16 of 300,001: 18,750), none beyond it, and the count decides."""
    n = 300_001
    assert kernels.close_cap(n) == 18_750 and kernels.close_cap(1000) == 256
    g = torch.Generator().manual_seed(count)
    ua = torch.randn(n, generator=g)
    ub = ua + 0.5
    where = torch.randperm(n, generator=g)[:count]
    ub[where] = ua[where]
    fa, fb = ua.sigmoid(), ub.sigmoid()
    slope, positions = kernels.quotient_secant(ua, fa, ub, fb, 3e-4)
    if count <= kernels.close_cap(n):
        assert torch.equal(positions.sort().values, where.sort().values)
    else:
        assert positions is None
    assert torch.isnan(slope).sum() == count  # 0/0 there, until the caller fills the derivative


@needs_kernels
@pytest.mark.parametrize("start, count, reported", [
    (0, 300, False), (150_000, 300, False),  # in one chunk of 4,096 elements: over its share
    (0, 200, True), (150_000, 200, True),
    (4096 - 150, 300, True),  # 150 in each of two chunks
])
def test_quotient_secant_kernel_leaves_a_dense_chunk_to_close_fill(start, count, reported):
    """A chunk holding more than its share of the cap is not scanned (a dense one most likely
    means a total past the cap): close inputs side by side, far below the cap of the whole
    tensor (18,750) but above a 4,096-element chunk's share of it (256), are not reported — the
    caller takes the derivative everywhere (close_fill) — fewer are."""
    n = 300_001
    ua = torch.randn(n, generator=torch.Generator().manual_seed(start + count))
    ub = ua + 0.5
    ub[start:start + count] = ua[start:start + count]
    slope, positions = kernels.quotient_secant(ua, ua.sigmoid(), ub, ub.sigmoid(), 3e-4)
    assert (positions is not None) == reported
    if reported:
        assert torch.equal(positions.sort().values, torch.arange(start, start + count))
    derivative = ua.sigmoid() * (1 - ua.sigmoid())
    assert kernels.close_fill(ua, ub, derivative, 3e-4, slope)
    assert torch.equal(slope[start:start + count], derivative[start:start + count])


@needs_kernels
@pytest.mark.parametrize("act", ["hardswish", "silu", "gelu", "mish", "softplus"])
@pytest.mark.parametrize("spread", [1e-5, 0.3])  # mostly close (many positions), mostly apart
def test_generic_secant_is_the_same_with_and_without_the_kernel(act, spread, monkeypatch):
    """The engine's generic secant (activations without a closed form): the kernel changes its
    speed, not its result, except that the derivative at the few close inputs is evaluated on
    those elements alone (ATen's scalar path there, which differs from its vectorised one by up
    to ~1e-7 absolute)."""
    from ttadapt import secant

    fn = getattr(torch.nn.functional, act)
    derivative = lambda u: torch.autograd.functional.vjp(fn, u, torch.ones_like(u))[1]  # noqa: E731
    g = torch.Generator().manual_seed(1)
    ua = torch.randn(70_001, generator=g) * 3
    ub = ua + torch.randn(70_001, generator=g) * spread
    ub[::97] = ua[::97]
    cases = [(ua, ub)]
    if spread > 1e-3:  # and channels-last (positions in memory order), laid out alike or not
        ua4 = ua[:70_000].view(25, 7, 20, 20).contiguous(memory_format=torch.channels_last)
        ub4 = ub[:70_000].view(25, 7, 20, 20).contiguous(memory_format=torch.channels_last)
        cases += [(ua4, ub4), (ua4, ub4.contiguous())]
    results = []
    for a, b in cases:
        results.append(secant.secant_slope(fn, derivative, a, fn(a), b.clone(), True, fn(b), True))
    monkeypatch.setitem(kernels._state, "lib", None)
    for (a, b), fused in zip(cases, results):
        near = _too_close(a, b, 3.4e-4)
        plain = secant.secant_slope(fn, derivative, a, fn(a), b.clone(), True, fn(b), True)
        assert near.any() and torch.equal(fused[~near], plain[~near])
        # (there ATen's scalar and vectorised derivatives differ: GELU's by up to ~1e-7 absolute)
        torch.testing.assert_close(fused[near], plain[near], rtol=4e-7, atol=2e-7)


def test_kernels_decline_what_they_do_not_cover():
    a = torch.randn(64, 64)
    assert kernels.tanh_secant(a.double(), a.double(), a.double(), a.double()) is None  # float64: PyTorch ops
    assert kernels.clamp_secant(a[:, ::2], a[:, ::2], 0.0, 1.0) is None  # not a block of memory
    assert kernels.clamp_secant(a, a.T, 0.0, 1.0) is None  # laid out differently
    b = a + torch.randn_like(a)
    misfit = torch.empty(64, 64).T  # an `out` laid out otherwise: the result goes to new memory
    for secant in (lambda out: kernels.clamp_secant(a, b, 0.0, 1.0, out=out),
                   lambda out: kernels.tanh_secant(a, a.tanh(), b, out=out),
                   lambda out: kernels.tanh_secant(a, a.tanh(), b, b.tanh(), out=out)):
        got = secant(misfit)
        assert got is not None and got is not misfit and got.is_contiguous() and torch.equal(got, secant(None))
    assert kernels.clamp_secant(torch.empty(0), torch.empty(0), 0.0, 1.0) is None
    assert kernels.quotient_secant(a.double(), a.double(), a.double(), a.double(), 1e-8) is None
    assert kernels.sigmoid_secant(a.double(), a.double(), a.double(), a.double()) is None
    assert kernels.quotient_secant(a, a, a.T, a, 3e-4) is None  # laid out differently
    p = a.clone()
    assert kernels.ag1_update(p, a.half(), a) is None and torch.equal(p, a)
    # channels-last (dense, permuted) tensors are walked in memory order
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    y = x + torch.randn_like(x)
    got = kernels.clamp_secant(x, y, 0.0, math.inf)
    quotient = (y.relu() - x.relu()) / (y - x)
    assert got is not None and torch.equal(got, torch.where(quotient.isnan(), (x > 0).float(), quotient))


@needs_kernels
@pytest.mark.parametrize("act", ["tanh", "relu", "sigmoid", "silu"])
def test_averaged_gradient_is_the_same_with_and_without_the_kernels(act, monkeypatch):
    """Model level: the kernels change the speed of averaged_grad, not its result (bit for bit
    for ReLU's exact secant, to float32 ulps for the closed forms of tanh and sigmoid and for
    SiLU's generic quotient); both schedules."""
    from ttadapt.averaged import DeferredAverage

    torch.manual_seed(5)
    layer = {"tanh": torch.nn.Tanh(), "relu": torch.nn.ReLU(inplace=True), "sigmoid": torch.nn.Sigmoid(),
             "silu": torch.nn.SiLU()}[act]
    model = torch.nn.Sequential(torch.nn.Linear(20, 300), layer, torch.nn.Linear(300, 300), layer, torch.nn.Linear(300, 3))
    x, y = torch.randn(600, 20), torch.randint(0, 3, (600,))
    other = {n: p.detach() + 0.05 * torch.randn_like(p) for n, p in model.named_parameters()}

    def closure():
        return torch.nn.functional.cross_entropy(model(x), y)

    def both():
        direct = ttadapt.averaged_grad(model, closure, other)
        run = DeferredAverage(model, closure)
        run.ordinary_grad()
        return direct, run.averaged_grad(other, seed="current")

    assert kernels.available()
    fused = both()
    monkeypatch.setitem(kernels._state, "lib", None)
    plain = both()
    for f, p in zip(fused, plain):
        for name in f:
            if act == "relu":
                assert torch.equal(f[name], p[name]), name
            else:
                torch.testing.assert_close(f[name], p[name], rtol=1e-5, atol=1e-7)


def _status_in_subprocess(tmp_path, warnings_raise: bool = True, **env) -> str:
    """A fresh process's ``available()`` and ``status()`` (its stdout), or its stderr if it fails
    (with ``warnings_raise``, a RuntimeWarning is raised, so a warning shows as a failure)."""
    code = "import ttadapt.kernels as k; print(k.available()); print(k.status())"
    full_env = {**os.environ, "TTADAPT_KERNEL_CACHE": str(tmp_path / "cache"), **env}
    flags = ["-W", "error::RuntimeWarning"] if warnings_raise else []
    done = subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)
    return done.stdout if done.returncode == 0 else done.stderr


@needs_kernels
def test_kernels_build_into_the_cache_and_can_be_turned_off(tmp_path):
    out = _status_in_subprocess(tmp_path)
    assert out.startswith("True") and "fused CPU kernels in use" in out
    built = list((tmp_path / "cache").glob("kernels-*.so"))
    assert len(built) == 1 and not list((tmp_path / "cache").glob(".build-*")), "one library, no half-written files"
    off = _status_in_subprocess(tmp_path, TTADAPT_FUSED_KERNELS="0")
    assert off.startswith("False") and "TTADAPT_FUSED_KERNELS=0" in off


def test_without_a_compiler_the_torch_ops_run(tmp_path):
    out = _status_in_subprocess(tmp_path, CC="/nonexistent/cc")
    assert out.startswith("False") and "no C compiler" in out


@needs_kernels
def test_an_unwritable_cache_falls_back_with_a_warning(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = _status_in_subprocess(tmp_path, TTADAPT_KERNEL_CACHE=str(blocker / "cache"))
    assert "RuntimeWarning: ttadapt: the fused CPU kernels did not compile" in out  # -W error: the warning, raised
    out = _status_in_subprocess(tmp_path, warnings_raise=False, TTADAPT_KERNEL_CACHE=str(blocker / "cache"))
    assert out.startswith("False") and "PyTorch ops in use" in out


@needs_kernels
def test_a_kernel_that_disagrees_with_pytorch_is_not_used(tmp_path):
    """The self-test at load: a build whose clamp secant forgets the derivative at ties is
    refused with a warning, and the PyTorch ops run."""
    source = (Path(kernels.__file__).with_name("_kernels.c")).read_text()
    broken = source.replace("return s != s ? derivative : s;", "return s;")
    assert broken != source
    (tmp_path / "_kernels.c").write_text(broken)
    code = ("import warnings, pathlib, ttadapt.kernels as k; k._SOURCE = pathlib.Path(r'%s');\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always'); print(k.available(), k.status(), [str(x.message) for x in w])") % (tmp_path / "_kernels.c")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TTADAPT_KERNEL_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("False") and "disagree with PyTorch (clamp secant)" in done.stdout


@needs_kernels
@pytest.mark.parametrize("method", ["AG1", "AG2"])
def test_ag1_and_ag2_steps_are_the_same_with_and_without_the_kernels(method, monkeypatch):
    """AG-1 / AG-2 with Adam on a ReLU network: the fused updates (and the fused deferred ReLU
    backward) against the PyTorch operations — three AG-1 steps bit for bit; one AG-2 step to
    float32 rounding of its rescaling (later steps amplify that rounding through Adam). The
    forecast is the real Adam step in both (the fused forecast is tested in test_closed_form)."""
    import copy

    import ttadapt.optim.forward_looking as forward_looking

    monkeypatch.setattr(forward_looking, "fused_forecast", lambda *args: None)
    torch.manual_seed(8)
    base = torch.nn.Sequential(torch.nn.Linear(20, 300), torch.nn.ReLU(inplace=True), torch.nn.Linear(300, 3))
    x, y = torch.randn(600, 20), torch.randint(0, 3, (600,))

    def run() -> list[torch.Tensor]:
        model = copy.deepcopy(base)
        wrapper = getattr(ttadapt, method)(model, torch.optim.Adam(model.parameters(), lr=1e-2))
        for _ in range(3 if method == "AG1" else 1):
            wrapper.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
        return [p.detach().clone() for p in model.parameters()] + [torch.tensor(wrapper.last_forecast_l1)]

    fused = run()
    monkeypatch.setitem(kernels._state, "lib", None)
    plain = run()
    for f, p in zip(fused[:-1], plain[:-1]):
        if method == "AG1":
            assert torch.equal(f, p)
        else:
            torch.testing.assert_close(f, p, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fused[-1], plain[-1], rtol=1e-6, atol=0)  # the forecast's L1 length


@pytest.mark.parametrize("fused", [True, False])
def test_ag2_matches_the_forecast_length_on_9m_parameters(fused, monkeypatch):
    """AG-2's committed step has the forecast's L1 length to 1e-6 also over millions of
    parameters, with the fused lengths and with the PyTorch fallback (a float32 ord-1 norm of
    the fallback was off by ~2e-3 at this size)."""
    if fused and not kernels.available():
        pytest.skip("no fused kernels here")
    if not fused:
        monkeypatch.setitem(kernels._state, "lib", None)
    torch.manual_seed(9)
    model = torch.nn.Sequential(torch.nn.Linear(3000, 3000), torch.nn.ReLU(), torch.nn.Linear(3000, 2))
    x, y = torch.randn(4, 3000), torch.randint(0, 2, (4,))
    wrapper = ttadapt.AG2(model, torch.optim.Adam(model.parameters(), lr=1e-3))
    wrapper.record_lengths = True
    wrapper.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
    forecast_l1, _, committed_l1, _ = wrapper.last_lengths
    assert abs(committed_l1 - forecast_l1) <= 1e-6 * forecast_l1, (committed_l1, forecast_l1)
    assert abs(wrapper.last_forecast_l1 - forecast_l1) <= 1e-6 * forecast_l1
