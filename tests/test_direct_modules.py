"""Models built of Sequential containers and standard modules run ttadapt's passes without the
function mode (sites.SiteSession._direct_modules): the same results bit for bit as with the
mode, and the mode wherever something else is in the model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ttadapt
import ttadapt.sites as sites


def standard_model() -> nn.Module:
    """Every activation class of sites._DIRECT_ACTIVATIONS, in place and not, with max pooling,
    BatchNorm and dropout."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ELU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Dropout(0.2),
        nn.Sequential(nn.Linear(6 * 2 * 2, 12), nn.Tanh(), nn.Linear(12, 12), nn.Sigmoid()),
        nn.Linear(12, 12), nn.GELU(approximate="tanh"), nn.Linear(12, 12), nn.LeakyReLU(0.2), nn.Linear(12, 12),
        nn.SiLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 12), nn.GELU(), nn.Linear(12, 3),
    )


class Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = standard_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x))  # a functional call: only the mode sees it


def _mode_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sites.SiteSession, "_direct_modules", lambda self, layout: None)


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    used: list[bool] = []
    real = sites.SiteSession._direct_modules

    def spy(self, layout):
        out = real(self, layout)
        used.append(out is not None)
        return out

    monkeypatch.setattr(sites.SiteSession, "_direct_modules", spy)
    return used


def _results(model: nn.Module, what: str, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """An averaged gradient (``what="averaged_grad"``) or three steps of a wrapper, then the
    model's state: what the tests below compare bit for bit."""
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    out: list[torch.Tensor] = []
    if what == "averaged_grad":
        other = {n: p.detach() + 0.05 * torch.randn_like(p) for n, p in model.named_parameters()}
        out = list(ttadapt.averaged_grad(model, closure, other).values())
    else:
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        wrapper = ttadapt.AG3(model, opt, d=1) if what == "AG3" else getattr(ttadapt, what)(model, opt)
        for _ in range(3):
            wrapper.step(closure)
    return out + list(model.state_dict().values())


@pytest.mark.parametrize("what", ["averaged_grad", "AG1", "AG2", "AG3"])
def test_same_bits_with_and_without_the_mode(what: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = torch.randn(16, 1, 10, 10), torch.randint(0, 3, (16,))

    def run(direct: bool) -> list[torch.Tensor]:
        if not direct:
            _mode_off(monkeypatch)
        torch.manual_seed(2)
        return _results(standard_model().train(), what, x, y)

    used = _spy(monkeypatch)
    direct = run(True)
    assert used and all(used)
    monkeypatch.undo()
    with_mode = run(False)
    assert all(torch.equal(a, b) for a, b in zip(direct, with_mode, strict=True))
    assert not any("forward" in vars(m) for m in standard_model().modules())


@pytest.mark.parametrize("case", ["custom", "hook", "subclass", "linear", "inspect", "other_leaf", "module_site"])
def test_the_mode_where_the_model_has_anything_else(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    used = _spy(monkeypatch)
    x = torch.randn(4, 1, 10, 10)
    model = standard_model()
    linear = False
    if case == "custom":
        model = Custom()
    elif case == "hook":
        model[1].register_forward_hook(lambda m, a, out: torch.tanh(out))
    elif case == "subclass":
        class Tanh2(nn.Tanh):
            def forward(self, input: torch.Tensor) -> torch.Tensor:
                return F.relu(input)

        model[8][1] = Tanh2()
    elif case == "linear":
        linear = True
    elif case == "other_leaf":
        model[8].append(nn.Hardswish())  # an activation module outside the direct table
    elif case == "module_site":  # a standard class registered as a whole-module site
        monkeypatch.setattr(ttadapt.activations, "_MODULE_ACTIVATIONS", dict(ttadapt.activations._MODULE_ACTIVATIONS))
        ttadapt.register_module_activation("sigmoid_module", nn.Sigmoid)  # (into the copy: undone with it)
    if case == "inspect":  # inspect lists every pointwise call: always through the mode
        report = ttadapt.inspect(model, x)
        assert used and not any(used)
        assert sum(c.averaged for c in report.calls) == 9
        return
    other = {n: p.detach() + 0.05 * torch.randn_like(p) for n, p in model.named_parameters()}
    ttadapt.averaged_grad(model, lambda: model(x).sum(), other, linear=linear)
    assert used and not any(used)
    if case == "custom":  # the functional ReLU outside the body is a site: the mode sees it
        calls = ttadapt.inspect(model, x).calls
        assert any(c.call == "relu" and c.averaged and c.module == "" for c in calls)


def test_the_plan_follows_the_registry_and_hooks_within_one_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The direct plan is worked out once per layout (both passes of a step share one), but a
    class registered as a whole-module site, or unregistered, or a hook added in between, is
    seen by the next pass of the same layout; patched forwards never outlive a pass."""
    from ttadapt.sites import SiteSession, _direct_plan
    from ttadapt.states import ModelLayout

    model = standard_model()
    layout = ModelLayout(model)
    session = SiteSession()
    assert _direct_plan(layout) is not None and _direct_plan(layout) is layout.memo["direct plan"]
    assert session._direct_modules(layout) is not None
    for module in model.modules():
        module.__dict__.pop("forward", None)
    monkeypatch.setattr(ttadapt.activations, "_MODULE_ACTIVATIONS", dict(ttadapt.activations._MODULE_ACTIVATIONS))
    ttadapt.register_module_activation("sigmoid_module", nn.Sigmoid)
    assert _direct_plan(layout) is None and session._direct_modules(layout) is None
    ttadapt.unregister_activation(nn.Sigmoid)
    assert _direct_plan(layout) is not None
    handle = model[1].register_forward_pre_hook(lambda m, a: None)
    assert session._direct_modules(layout) is None
    handle.remove()
    x = torch.randn(2, 1, 10, 10)
    other = {n: p.detach() + 0.05 * torch.randn_like(p) for n, p in model.named_parameters()}
    ttadapt.averaged_grad(model, lambda: model(x).sum(), other)
    assert not any("forward" in vars(m) for m in model.modules())


class _NormWithActivation(nn.BatchNorm1d):
    """A subclass of a plain leaf whose forward calls an activation: not a plain leaf."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(input))


def _leaves_with_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sites.SiteSession, "_leaves_without_mode", lambda self, layout: [])


@pytest.mark.parametrize("what", ["averaged_grad", "AG2", "AG3"])
def test_plain_leaves_without_the_mode_give_the_same_bits(what: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a model that needs the mode (Custom: a functional call), BatchNorm, Conv, Linear,
    Dropout and Flatten run with the mode off the stack: the same results bit for bit as with it,
    no patched forward left behind, and the subclass's activation still seen."""
    x, y = torch.randn(16, 1, 10, 10), torch.randint(0, 3, (16,))

    def run() -> list[torch.Tensor]:
        torch.manual_seed(2)
        model = Custom().train()
        model.body.append(_NormWithActivation(3))
        out = _results(model, what, x, y)
        assert not any("forward" in vars(m) for m in model.modules())
        return out

    patched: list[int] = []
    real = sites.SiteSession._leaves_without_mode
    monkeypatch.setattr(sites.SiteSession, "_leaves_without_mode",
                        lambda self, layout: patched.append(len(out := real(self, layout))) or out)
    sites_seen: list[str] = []
    real_site = sites.SiteSession._on_activation
    monkeypatch.setattr(sites.SiteSession, "_on_activation",
                        lambda self, func, act, *a: sites_seen.append(act.name) or real_site(self, func, act, *a))
    without = run()
    assert patched and all(n == 13 for n in patched)  # 2 Conv2d, 1 BatchNorm2d, Flatten, Dropout, 8 Linear
    assert sites_seen.count("relu") >= 2 * 3  # per pass: the body's ReLU, the subclass's, Custom's
    monkeypatch.undo()
    _leaves_with_mode(monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(without, run(), strict=True))


def test_the_mode_is_back_on_the_stack_after_a_leaf_fails() -> None:
    model = Custom()
    x = torch.randn(4, 2, 10, 10)  # the first Conv2d takes one channel
    with pytest.raises(RuntimeError, match="channels"):
        ttadapt.averaged_grad(model, lambda: model(x).sum(), {})
    assert torch._C._len_torch_function_stack() == 0
    assert not any("forward" in vars(m) for m in model.modules())
    x = torch.randn(4, 1, 10, 10)
    torch.manual_seed(1)  # (the same dropout masks)
    got = ttadapt.averaged_grad(model, lambda: model(x).sum(), None)
    torch.manual_seed(1)
    want = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    for a, b in zip(got.values(), want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
