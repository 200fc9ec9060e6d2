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
from torch.nn.utils.stateless import _reparametrize_module

__all__ = ["resolve_state", "evaluated_at", "fork_rng", "trainable_parameters"]


def trainable_parameters(model: nn.Module) -> dict[str, Tensor]:
    """``named_parameters()`` that require a gradient, in order."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def resolve_state(model: nn.Module, state: Mapping[str, Tensor] | None, what: str = "other") -> dict[str, Tensor]:
    """Check ``state`` against ``model`` and return a full, detached state on the model's devices.

    Raises ``TypeError``/``ValueError`` naming unknown names, wrong shapes and non-tensors.
    """
    params = dict(model.named_parameters())
    if state is None:
        state = {}
    if not isinstance(state, Mapping):
        raise TypeError(f"`{what}` must be a mapping from parameter names to tensors, got {type(state).__name__}")
    canonical = {id(p): name for name, p in params.items()}
    aliases = {name: canonical[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}
    unknown = [k for k in state if k not in aliases]
    if unknown:
        hints = []
        for k in unknown[:3]:
            close = difflib.get_close_matches(str(k), list(params), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise ValueError(f"`{what}` names parameters the model does not have: {', '.join(hints)}{more}")
    full = {name: p.detach() for name, p in params.items()}
    for key, value in state.items():
        name = aliases[key]
        if not isinstance(value, Tensor):
            raise TypeError(f"`{what}[{key!r}]` must be a tensor, got {type(value).__name__}")
        p = params[name]
        if value.shape != p.shape:
            raise ValueError(f"`{what}[{key!r}]` has shape {tuple(value.shape)}, the parameter has {tuple(p.shape)}")
        if value.is_floating_point() != p.is_floating_point() or value.is_complex() != p.is_complex():
            raise ValueError(f"`{what}[{key!r}]` has dtype {value.dtype}, the parameter has {p.dtype}")
        full[name] = value.detach().to(device=p.device, dtype=p.dtype)
    return full


@contextlib.contextmanager
def evaluated_at(model: nn.Module, state: Mapping[str, Tensor], copy_buffers: bool = True) -> Iterator[None]:
    """Inside the block, ``model`` computes with the parameters ``state``.

    With ``copy_buffers`` the module also gets private copies of its buffers, so that BatchNorm
    running statistics and ``num_batches_tracked`` updated in the block leave the model's own
    buffers untouched.
    """
    tensors: dict[str, Tensor] = dict(state)
    if copy_buffers:
        for name, buf in model.named_buffers():
            tensors[name] = buf.clone()
    with _reparametrize_module(model, tensors, tie_weights=True, strict=False):
        yield


def _cuda_devices(model: nn.Module) -> list[int]:
    devices = {t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"}
    devices |= {t.device.index or 0 for t in model.buffers() if t.device.type == "cuda"}
    return sorted(devices)


class fork_rng:
    """Capture the CPU and CUDA random states once; :meth:`rewind` puts them back.

    Every pass started right after a ``rewind()`` draws the same dropout masks.
    """

    def __init__(self, model: nn.Module) -> None:
        self.devices = _cuda_devices(model)
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    def rewind(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, s in zip(self.devices, self.cuda):
            torch.cuda.set_rng_state(s, d)
