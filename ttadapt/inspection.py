"""``ttadapt.inspect``: which pointwise calls of a forward pass the averaged backward averages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .sites import SiteCall, SiteSession
from .states import evaluated_at, fork_rng

__all__ = ["inspect", "InspectionReport"]


@dataclass
class InspectionReport:
    """Every pointwise call of one forward pass, in call order.

    ``averaged`` holds the activation sites the engine replaces by secants (and, with
    ``linear=True``, the affine layers it averages); ``unaveraged`` the other nonlinear pointwise
    calls of values that depend on a parameter (exp, rsqrt, pow, clamp, threshold, ... inside
    normalisations or custom code; not those of constants, such as a rotary embedding's ``cos`` of
    positions, which both passes see alike) and a recurrent layer's fused call where it stays
    fused (``lstm``, ``gru``, ... under autocast), which keep their ordinary derivative, and
    activations called with gradient recording off (``grad_off``): inside a custom
    ``torch.autograd.Function``, whose own backward gives their gradient, or under ``no_grad``,
    where none is taken. ``str(report)`` renders a table grouped by module path.
    """

    model: str
    calls: list[SiteCall] = field(default_factory=list)

    @property
    def averaged(self) -> list[SiteCall]:
        return [c for c in self.calls if c.averaged]

    @property
    def unaveraged(self) -> list[SiteCall]:
        return [c for c in self.calls if not c.averaged]

    def rows(self) -> list[tuple[str, str, int, bool]]:
        """(module path, call, number of calls, averaged) grouped in first-call order."""
        groups: dict[tuple[str, str, bool], int] = {}
        for c in self.calls:
            key = (c.module or "(model)", c.call + ("_" if c.inplace else "") + (" (grad off)" if c.grad_off else ""), c.averaged)
            groups[key] = groups.get(key, 0) + 1
        return [(m, call, n, avg) for (m, call, avg), n in groups.items()]

    def summary(self) -> str:
        n, bad = len(self.calls), len(self.unaveraged)
        verdict = "all averaged" if bad == 0 else f"{bad} NOT averaged"
        return f"{self.model}: {n} pointwise call{'s' if n != 1 else ''}, {verdict}"

    def __str__(self) -> str:
        rows = self.rows()
        lines = [self.summary()]
        if rows:
            width = max(len("module"), *(len(r[0]) for r in rows))
            cwidth = max(len("call"), *(len(r[1]) for r in rows))
            lines.append(f"  {'module':<{width}}  {'call':<{cwidth}}  calls  averaged")
            for module, call, n, avg in rows:
                lines.append(f"  {module:<{width}}  {call:<{cwidth}}  {n:>5}  {'yes' if avg else 'NO'}")
        if any(not c.averaged and not c.grad_off for c in self.calls):
            lines.append("  (NO: keeps its ordinary derivative at the graph state, as a normalisation's or softmax's "
                         "internals do by design; an activation written by hand can be taught to the engine with "
                         "ttadapt.register_activation)")
        if any(c.grad_off for c in self.calls):
            lines.append("  (grad off: called with gradient recording off — inside a custom autograd.Function, whose "
                         "own backward gives its gradient, or under no_grad)")
        return "\n".join(lines)


def inspect(model: nn.Module, *example_inputs: Any, linear: bool = False, **example_kwargs: Any) -> InspectionReport:
    """Run one forward pass of ``model`` on the example inputs and report its pointwise calls
    (every activation call; the other nonlinear ones where a value depends on a parameter).

    The pass runs as in training, with gradient recording on (so that activations called with it
    off — inside a custom ``autograd.Function`` — show; its graph is dropped at once), on private
    copies of the buffers and a rewound RNG: the model, its BatchNorm statistics and the random
    state are left as they were.
    """
    session = SiteSession(linear=linear, track_modules=True)
    rng = fork_rng(model)
    try:
        with torch.enable_grad(), evaluated_at(model, {}), session.run(model, "inspect"):
            model(*example_inputs, **example_kwargs)
    finally:
        rng.rewind()
    return InspectionReport(type(model).__name__, session.calls)
