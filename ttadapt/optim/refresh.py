"""AG-2's dry step without the base optimizer's preconditioner refresh, where that is proved safe.

AG-2's dry step θ″ = OPT(s_before, θ, G′) is a real ``step()`` whose state is thrown away
(spec §3): only the parameters it produces are kept. SOAP (``pytorch_optimizer.SOAP``) ends each
parameter's update with ``update_pre_conditioner``, which refreshes that parameter's Kronecker
factors (every step) and eigenbases (every ``precondition_frequency`` steps) — about a third of
SOAP's step, and nothing θ″ depends on when it runs after the parameter's update. So the dry
step runs with that method replaced by a no-op, but only when the real step just before (the
forecast, from the same code and settings) showed the order: :class:`RefreshProbe` records each
parameter's version counter when its state is refreshed, and the skip is taken only if no
parameter changed after its own refresh in that step (and every refresh concerned one parameter
of the optimizer's). A version of the library that refreshed before updating fails the check and
keeps the full dry step.

Optimizers are matched by their exact class (``_REFRESH_METHODS``): a subclass may reorder its step.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from torch import Tensor

from .snapshot import BATCHED_SOAP_MODULE, _optimizers

__all__ = ["RefreshProbe", "skipped_refresh"]

# (module, class name) -> the method that refreshes one parameter's preconditioner state, called
# as method(grad, state, ...) after that parameter's update
# (ttadapt's batched SOAP: its batched parameters' factors and eigenbases are refreshed after
# their update as well, without this method; the method serves the rest, through the library's loop)
_REFRESH_METHODS: dict[tuple[str, str], str] = {("pytorch_optimizer.optimizer.soap", "SOAP"): "update_pre_conditioner",
                                                (BATCHED_SOAP_MODULE, "BatchedSOAP"): "update_pre_conditioner"}


def _targets(optimizer: Any) -> list[tuple[Any, str]]:
    """``(optimizer, method name)`` for every (nested) optimizer with a known refresh method that
    is not shadowed on the instance already."""
    found = []
    for opt in _optimizers(optimizer):
        name = _REFRESH_METHODS.get((type(opt).__module__, type(opt).__name__))
        if name is not None and name not in vars(opt):
            found.append((opt, name))
    return found


class RefreshProbe:
    """Around a real ``step()``: whether every preconditioner refresh in it came after the last
    change of its parameter (:attr:`safe`), i.e. whether a dry step from the same settings may
    skip the refreshes without changing the parameters it produces."""

    def __init__(self, optimizer: Any) -> None:
        self.targets = _targets(optimizer)
        self.safe = False
        self._calls: list[tuple[Tensor | None, int]] = []

    def __enter__(self) -> "RefreshProbe":
        self._calls = []
        for opt, name in self.targets:
            real = getattr(opt, name)
            owners: dict[int, Tensor] = {}

            def probe(grad: Any, state: Any, *args: Any, _real: Any = real, _opt: Any = opt, _owners: dict = owners, **kwargs: Any):
                if id(state) not in _owners:  # (states appear during the step: looked up when first seen)
                    _owners.update({id(s): p for p, s in _opt.state.items()})
                p = _owners.get(id(state))
                self._calls.append((p, -1 if p is None else p._version))
                return _real(grad, state, *args, **kwargs)

            setattr(opt, name, probe)
        return self

    def __exit__(self, *exc: Any) -> None:
        for opt, name in self.targets:
            vars(opt).pop(name, None)
        self.safe = bool(self._calls) and all(p is not None and p._version == v for p, v in self._calls)
        self._calls = []


@contextlib.contextmanager
def skipped_refresh(optimizer: Any, skip: bool) -> Iterator[None]:
    """Inside the block (with ``skip``), the known refresh methods of ``optimizer`` do nothing."""
    targets = _targets(optimizer) if skip else []
    for opt, name in targets:
        setattr(opt, name, _no_refresh)
    try:
        yield
    finally:
        for opt, name in targets:
            vars(opt).pop(name, None)


def _no_refresh(*args: Any, **kwargs: Any) -> None:
    return None
