"""The cyclic garbage collector during a step: off inside, as it was after, and nothing of the
step's left for it to find (ttadapt.collector)."""

from __future__ import annotations

import gc
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ttadapt
from ttadapt.collector import collector_paused, pausing_collector


def _model() -> nn.Module:
    # a small tanh site, an ELU site over the 64K-element limit of the product route, an
    # in-place ReLU (the hooked native node) and a BatchNorm
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ELU(), nn.MaxPool2d(2), nn.Conv2d(8, 4, 3),
                         nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 14 * 14, 16), nn.Tanh(), nn.Linear(16, 5))


def _steppers(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seen: list[bool]):
    def closure():
        seen.append(gc.isenabled())
        return F.cross_entropy(model(x), y)

    other = {n: p.detach() + 1e-2 for n, p in model.named_parameters()}
    return {
        "AG1": (lambda w: lambda: w.step(closure))(ttadapt.AG1(model, torch.optim.Adam(model.parameters(), 1e-3))),
        "AG2": (lambda w: lambda: w.step(closure))(ttadapt.AG2(model, torch.optim.SGD(model.parameters(), 1e-3, momentum=0.9))),
        "AG3": (lambda w: lambda: w.step(closure))(ttadapt.AG3(model, torch.optim.RMSprop(model.parameters(), 1e-3), d=1)),
        "SAM": (lambda w: lambda: w.step(closure))(ttadapt.SAM(model, torch.optim.Adam(model.parameters(), 1e-3))),
        "averaged_grad": lambda: ttadapt.averaged_grad(model, closure, other),
    }


@pytest.mark.parametrize("what", ["AG1", "AG2", "AG3", "SAM", "averaged_grad"])
@pytest.mark.parametrize("enabled", [True, False])
def test_collector_off_inside_and_restored(what: str, enabled: bool) -> None:
    seen: list[bool] = []
    step = _steppers(_model().train(), torch.randn(32, 1, 32, 32), torch.randint(0, 5, (32,)), seen)[what]
    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        step()
        step()
        assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()
    assert seen and not any(seen)


def test_collector_restored_when_the_step_raises() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    wrapper = ttadapt.AG1(model, torch.optim.Adam(model.parameters()))
    assert gc.isenabled()

    def failing():
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        wrapper.step(failing)
    assert gc.isenabled()


def test_nested_and_concurrent_pauses_end_with_the_last() -> None:
    assert gc.isenabled()
    inner = pausing_collector(lambda: gc.isenabled())
    with collector_paused():
        assert inner() is False
        assert not gc.isenabled()  # the inner step's end does not turn it back on
    assert gc.isenabled()

    entered, release = threading.Event(), threading.Event()

    def other_thread():
        with collector_paused():
            entered.set()
            release.wait(10)

    t = threading.Thread(target=other_thread)
    t.start()
    entered.wait(10)
    with collector_paused():
        pass
    assert not gc.isenabled()  # the other thread's step still runs
    release.set()
    t.join()
    assert gc.isenabled()


@pytest.mark.parametrize("what", ["AG1", "AG2", "AG3", "SAM", "averaged_grad"])
def test_a_step_leaves_no_cyclic_garbage(what: str) -> None:
    """What reference counting does not free would pile up while the collector is off: a step
    must build no reference cycle through ttadapt's objects or any tensor."""
    step = _steppers(_model().train(), torch.randn(32, 1, 32, 32), torch.randint(0, 5, (32,)), [])[what]
    step()
    gc.collect()
    flags = gc.get_debug()
    gc.set_debug(gc.DEBUG_SAVEALL)  # keep what the collection finds, to look at it
    try:
        step()
        step()
        gc.collect()
        found = list(gc.garbage)
    finally:
        gc.set_debug(flags)
        gc.garbage.clear()

    def ours(o: object) -> bool:
        module = getattr(o, "__module__", None) if callable(o) else type(o).__module__
        frame = getattr(o, "f_code", None)
        return (isinstance(o, torch.Tensor) or (isinstance(module, str) and module.startswith("ttadapt"))
                or (frame is not None and "ttadapt" in frame.co_filename))

    assert [o for o in found if ours(o)] == []
