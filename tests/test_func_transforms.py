"""A model whose forward runs part of itself under a ``torch.func`` transform (``vmap`` over an
ensemble's stacked weights). The transform's wrapped tensors cannot be kept between the passes:
kept anyway, they gave a silently wrong averaged gradient (28 % off the exact one on the model
below). Those sites now keep their ordinary derivative with a warning and ``inspect`` lists them;
and the fused kernels' one-time self-test, when the first kernel call came inside ``vmap``,
failed on its random inputs."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.func import vmap

import ttadapt

pytestmark = pytest.mark.usefixtures("fresh_ttadapt_warnings")


class _Ensemble(nn.Module):
    """Three tanh networks, run by ``vmap`` or by a loop (the same function)."""

    def __init__(self, use_vmap: bool) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(3, 4, 8, generator=g, dtype=torch.float64) * 0.5)
        self.w2 = nn.Parameter(torch.randn(3, 8, 2, generator=g, dtype=torch.float64) * 0.5)
        self.use_vmap = use_vmap

    def forward(self, x):
        def one(w1, w2, x):
            return torch.tanh(x @ w1) @ w2

        if self.use_vmap:
            return vmap(one, in_dims=(0, 0, None))(self.w1, self.w2, x).mean(0)
        return torch.stack([one(self.w1[k], self.w2[k], x) for k in range(3)]).mean(0)


def _case(use_vmap: bool):
    model = _Ensemble(use_vmap)
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randn(16, 2, generator=g, dtype=torch.float64)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    other = dict(start, w1=start["w1"] + 0.5 * torch.randn(start["w1"].shape, generator=g, dtype=torch.float64))
    return model, (lambda: (model(x) * c).sum()), start, other, x


def test_the_loop_twin_is_exact_and_the_vmap_model_keeps_the_ordinary_derivative():
    # only w1 moves and the loss is linear in the output: the averaged gradient is the exact one
    loop, closure, start, other, _ = _case(use_vmap=False)
    exact = ttadapt.path_average_grad(loop, closure, start, other, points=64)
    got = ttadapt.averaged_grad(loop, closure, other)
    assert torch.allclose(got["w1"], exact["w1"], rtol=1e-10, atol=1e-12)
    model, closure, start, other, _ = _case(use_vmap=True)
    with pytest.warns(RuntimeWarning, match="tanh ran inside a torch.func transform"):
        got = ttadapt.averaged_grad(model, closure, other)
    ordinary = torch.autograd.grad(closure(), [model.w1, model.w2])
    assert torch.equal(got["w1"], ordinary[0]) and torch.equal(got["w2"], ordinary[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ttadapt.AG3(model, torch.optim.SGD(model.parameters(), lr=0.1), d=1).step(closure)  # (warned once)


def test_inspect_lists_sites_inside_a_transform():
    model, _, _, _, x = _case(use_vmap=True)
    report = ttadapt.inspect(model, x)
    assert [(c.call, c.averaged) for c in report.calls] == [("tanh (in torch.func transform)", False)]


def test_the_kernels_first_call_inside_vmap_sets_them_up_later():
    """In a fresh process (the kernels set themselves up on their first call): asked inside
    ``vmap`` they are not in use yet; at the next call outside they are."""
    code = (
        "import torch, ttadapt\n"
        "from torch.func import vmap\n"
        "seen = []\n"
        "vmap(lambda t: (seen.append((ttadapt.kernels.available(), ttadapt.kernels.status())), t)[1])(torch.zeros(3))\n"
        "print(seen[0][0], 'not set up yet' in seen[0][1], ttadapt.kernels.available() == (ttadapt.kernels._compiler() is not None))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True", "True"]
