"""Parameter states: validating user-given states, evaluating a model at one, forking the RNG.

A *state* is a mapping from ``model.named_parameters()`` names to tensors; a name left out means
"the model's current value". Evaluating the model at another state never writes into its
parameters: the module attributes are swapped for the duration of the call (as
``torch.func.functional_call`` does), so autograd's version counters and any retained graph of
the real parameters stay valid.
"""

from __future__ import annotations

import contextlib
import difflib
from typing import Iterator, Mapping

import torch
from torch import Tensor, nn

__all__ = ["ModelLayout", "resolve_state", "evaluated_at", "fork_rng"]


class ModelLayout:
    """One walk over a model: where every parameter and buffer lives, and every submodule.

    Tied parameters (one tensor registered under several names) appear once in ``params``, under
    the name ``named_parameters()`` gives them; ``aliases`` maps every name to that one.
    """

    def __init__(self, model: nn.Module) -> None:
        self.params: dict[str, Tensor] = {}
        self.aliases: dict[str, str] = {}
        self.param_slots: list[tuple[nn.Module, str, str]] = []
        self.buffers: dict[str, Tensor] = {}
        self.buffer_slots: list[tuple[nn.Module, str, str]] = []
        self.modules: list[tuple[str, nn.Module]] = []
        self.memo: dict[str, object] = {}  # what engine parts derive from this walk (see sites._direct_plan)
        seen_params: dict[int, str] = {}
        seen_buffers: dict[int, str] = {}
        seen_modules: set[int] = set()
        for path, module in model.named_modules(remove_duplicate=False):
            if id(module) not in seen_modules:
                seen_modules.add(id(module))
                self.modules.append((path, module))
            prefix = f"{path}." if path else ""
            _collect(module, module._parameters, prefix, seen_params, self.params, self.param_slots, self.aliases)
            _collect(module, module._buffers, prefix, seen_buffers, self.buffers, self.buffer_slots, {})

    def trainable(self) -> dict[str, Tensor]:
        """Parameters that require a gradient, in ``named_parameters()`` order."""
        return {name: p for name, p in self.params.items() if p.requires_grad}

    def cuda_devices(self) -> list[int]:
        if not torch.cuda.is_initialized():  # then no tensor lives on a CUDA device (the usual CPU case: no walk)
            return []
        tensors = [*self.params.values(), *self.buffers.values()]
        return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


def _collect(module: nn.Module, table: dict, prefix: str, seen: dict[int, str], first: dict[str, Tensor],
             slots: list, aliases: dict[str, str]) -> None:
    """Record the tensors of one module's ``_parameters`` or ``_buffers`` table."""
    for attr, tensor in table.items():
        if tensor is None:
            continue
        name = prefix + attr
        canonical = seen.setdefault(id(tensor), name)
        if canonical == name:
            first[name] = tensor
        aliases[name] = canonical
        slots.append((module, attr, canonical))


def _layout(model_or_layout: nn.Module | ModelLayout) -> ModelLayout:
    return model_or_layout if isinstance(model_or_layout, ModelLayout) else ModelLayout(model_or_layout)


def resolve_state(model: nn.Module | ModelLayout, state: Mapping[str, Tensor] | None, what: str = "other") -> dict[str, Tensor]:
    """Check ``state`` against the model and return a full, detached state on the model's devices.

    Raises ``TypeError``/``ValueError`` naming unknown names, wrong shapes and non-tensors.
    """
    layout = _layout(model)
    params = layout.params
    if state is None:
        state = {}
    if not isinstance(state, Mapping):
        raise TypeError(f"`{what}` must be a mapping from parameter names to tensors, got {type(state).__name__}")
    aliases = layout.aliases
    unknown = [k for k in state if k not in aliases]
    if unknown:
        hints = []
        for k in unknown[:3]:
            close = difflib.get_close_matches(str(k), list(params), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise ValueError(f"`{what}` names parameters the model does not have: {', '.join(hints)}{more}")
    given: dict[str, Tensor] = {}
    for key, value in state.items():
        name = aliases[key]
        if not isinstance(value, Tensor):
            raise TypeError(f"`{what}[{key!r}]` must be a tensor, got {type(value).__name__}")
        p = params[name]
        if value.shape != p.shape:
            raise ValueError(f"`{what}[{key!r}]` has shape {tuple(value.shape)}, the parameter has {tuple(p.shape)}")
        if value.dtype is not p.dtype or not ((value.is_cpu and p.is_cpu) or value.device == p.device):  # (same dtype, same kind)
            if value.is_floating_point() != p.is_floating_point() or value.is_complex() != p.is_complex():
                raise ValueError(f"`{what}[{key!r}]` has dtype {value.dtype}, the parameter has {p.dtype}")
            value = value.to(device=p.device, dtype=p.dtype)
        # (a plain tensor outside any graph is used as it is: detach() would only make another
        # tensor object on the same memory, a µs per parameter and step)
        given[name] = value if type(value) is Tensor and not value.requires_grad else value.detach()
    if len(given) == len(params) and list(given) == list(params):
        return given
    return {name: given[name] if name in given else p.detach() for name, p in params.items()}


@contextlib.contextmanager
def evaluated_at(model: nn.Module | ModelLayout, state: Mapping[str, Tensor], copy_buffers: bool = True) -> Iterator[None]:
    """Inside the block, the model computes with the parameters ``state`` (canonical names).

    With ``copy_buffers`` the module also gets private copies of its buffers, so that BatchNorm
    running statistics and ``num_batches_tracked`` updated in the block leave the model's own
    buffers untouched.
    """
    layout = _layout(model)
    swapped: list[tuple[dict, str, Tensor]] = []
    try:
        for module, attr, name in layout.param_slots:
            value = state.get(name)
            if value is not None:
                swapped.append((module._parameters, attr, module._parameters[attr]))
                module._parameters[attr] = value
        if copy_buffers:
            copies = {name: b.clone() for name, b in layout.buffers.items()}
            for module, attr, name in layout.buffer_slots:
                swapped.append((module._buffers, attr, module._buffers[attr]))
                module._buffers[attr] = copies[name]
        yield
    finally:
        for table, attr, original in reversed(swapped):
            table[attr] = original


class fork_rng:
    """Capture the CPU and CUDA random states once; :meth:`rewind` puts them back.

    Every pass started right after a ``rewind()`` draws the same dropout masks.
    """

    def __init__(self, model: nn.Module | ModelLayout) -> None:
        self.devices = _layout(model).cuda_devices()
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    def rewind(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, s in zip(self.devices, self.cuda):
            torch.cuda.set_rng_state(s, d)
