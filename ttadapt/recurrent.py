"""Recurrent layers taken apart, so that their gates become averaged sites.

``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and their cells compute every time step in one fused ATen
call (``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh``, ``torch.rnn_relu``, ``torch.lstm_cell``,
...), inside which no site sees the sigmoid / tanh / ReLU gates. During the engine's passes such
a call is computed from its parts instead, one layer and direction at a time:

* a padded or packed sequence by :func:`ttadapt.recurrent_sequence.whole_sequence`: the fused
  call's values, one site per gate over all steps (with the Linear variant, one affine site per
  projection over all steps), backpropagation through time by hand;
* the cells, and a packed sequence's backward direction under AG-2 Linear, step by step,
  following PyTorch's own CPU recipe (``aten/src/ATen/native/RNN.cpp``) — the input projection
  ``x W_ihᵀ + b_ih`` of every time step at once, then per time step
  ``gates = (h W_hhᵀ + b_hh) + x_t``, chunked, each gate's activation one call of ``act`` — the
  session's site handler — and the cell update:

  - LSTM: ``i, f, o = σ(·)``, ``g = tanh(·)``, ``c′ = f·c + i·g``, ``h′ = o·tanh(c′)``
    (times ``W_hrᵀ`` with ``proj_size``);
  - GRU: ``r, z = σ(·)``, ``n = tanh(x_n + r·(h W_hnᵀ + b_hn))``, ``h′ = (h − n)·z + n``;
  - RNN: ``h′ = tanh(·)`` or ``relu(·)``;

  packed sequences (``batch_sizes``) shrink the batch as sequences end, as ATen's packed layers
  do, and the reversed direction grows it back; with ``linear=True`` the projections are affine
  sites too (``linear``).

Between layers, in training with ``dropout``, ``torch.dropout`` runs on the layer's output (the
fused call's own dropout, drawing the same random numbers); bidirectional layers run the
reversed sequence and concatenate. Both passes of a step (and ``inspect``) take the same route,
so they pair site by site. The step-by-step outputs equal the fused call's to rounding (at most
2.2e-16 in float64, 1.2e-7 in float32 LSTMs, which the CPU runs on oneDNN; the cells bit for
bit: tests/test_recurrent.py).

:func:`unfused` returns ``NotImplemented`` — and the fused call runs, its gates keeping the
ordinary derivative — under autocast (whose casts of a fused call and of its parts differ) and
for arguments it does not recognise.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .recurrent_sequence import Pair, Schedule, split_weights, whole_sequence

__all__ = ["fused_kind", "unfused"]

Act = Callable[[Callable, Tensor], Tensor]  # (activation function, its input) -> output, through a site
Linear = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]

_LAYERS: dict[Any, str] = {}
_CELLS: dict[Any, str] = {}
for _name in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
    if hasattr(torch, _name):
        _LAYERS[getattr(torch, _name)] = _name
    if hasattr(torch, _name + "_cell"):
        _CELLS[getattr(torch, _name + "_cell")] = _name
_KINDS = {**_LAYERS, **_CELLS}


def fused_kind(func: Any) -> str | None:
    """``"lstm"``, ``"gru"``, ``"rnn_tanh"`` or ``"rnn_relu"`` for a fused recurrent call (layer or
    cell), else None. (Asked of every call the function mode sees: one dictionary lookup.)"""
    try:
        return _KINDS.get(func)
    except TypeError:  # (an unhashable callable)
        return None


class _Weights:
    """One layer-direction's weights, as the fused call's flat list holds them."""

    __slots__ = ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr")

    def __init__(self, flat: Sequence[Tensor], has_biases: bool) -> None:
        self.w_ih, self.w_hh, self.b_ih, self.b_hh, self.w_hr = split_weights(flat, has_biases)


def _cell_step(kind: str, x_w: Tensor, hidden: Any, p: _Weights, act: Act, linear: Linear) -> Any:
    """One time step from the input's projection ``x_w``: the new hidden state (a pair for LSTM)."""
    if kind == "lstm":
        h, c = hidden
        gates = linear(h, p.w_hh, p.b_hh) + x_w
        # (each gate contiguous: the sites' kernels take contiguous inputs; one copy of `gates`)
        i, f, g, o = gates.unflatten(-1, (4, -1)).transpose(0, 1).contiguous().unbind(0)
        i, f = act(torch.sigmoid, i), act(torch.sigmoid, f)
        g, o = act(torch.tanh, g), act(torch.sigmoid, o)
        c = f * c + i * g
        h = o * act(torch.tanh, c)
        if p.w_hr is not None:
            h = linear(h, p.w_hr, None)
        return h, c
    hg = linear(hidden, p.w_hh, p.b_hh)
    if kind == "gru":
        hr, hz, hn = hg.chunk(3, 1)
        xr, xz, xn = x_w.chunk(3, 1)
        r = act(torch.sigmoid, hr + xr)
        z = act(torch.sigmoid, hz + xz)
        n = act(torch.tanh, xn + hn * r)
        return (hidden - n) * z + n
    return act(torch.tanh if kind == "rnn_tanh" else torch.relu, hg + x_w)


def _output(kind: str, hidden: Any) -> Tensor:
    return hidden[0] if kind == "lstm" else hidden


def _slice(kind: str, hidden: Any, start: int, end: int) -> Any:
    if kind == "lstm":
        return hidden[0][start:end], hidden[1][start:end]
    return hidden[start:end]


def _concat(kind: str, parts: list) -> Any:
    if kind == "lstm":
        return torch.cat([h for h, _ in parts], 0), torch.cat([c for _, c in parts], 0)
    return torch.cat(parts, 0)


def _direction(kind: str, x_w: Tensor, hidden: Any, p: _Weights, act: Act, linear: Linear, reverse: bool,
               batch_sizes: list[int] | None) -> tuple[Tensor, Any]:
    """One layer in one direction over the projected inputs ``x_w``: (outputs, final hidden)."""
    outputs: list[Tensor] = []
    if batch_sizes is None:  # padded (time, batch, features)
        steps = range(x_w.shape[0] - 1, -1, -1) if reverse else range(x_w.shape[0])
        for t in steps:
            hidden = _cell_step(kind, x_w[t], hidden, p, act, linear)
            outputs.append(_output(kind, hidden))
        if reverse:
            outputs.reverse()
        return torch.stack(outputs, 0), hidden
    # packed: rows of x_w are time-major, batch_sizes[t] of them at step t, decreasing
    if not reverse:
        offset, last, finished = 0, batch_sizes[0], []
        for size in batch_sizes:
            if size < last:  # sequences ended: keep their final hidden state
                finished.append(_slice(kind, hidden, size, last))
                hidden = _slice(kind, hidden, 0, size)
            last = size
            hidden = _cell_step(kind, x_w[offset:offset + size], hidden, p, act, linear)
            offset += size
            outputs.append(_output(kind, hidden))
        finished.append(hidden)
        finished.reverse()
        return torch.cat(outputs, 0), _concat(kind, finished)
    initial = hidden
    offset, last = x_w.shape[0], batch_sizes[-1]
    hidden = _slice(kind, initial, 0, last)
    for size in reversed(batch_sizes):
        if size > last:  # sequences start (from their end): their initial hidden state joins
            hidden = _concat(kind, [hidden, _slice(kind, initial, last, size)])
        hidden = _cell_step(kind, x_w[offset - size:offset], hidden, p, act, linear)
        offset -= size
        last = size
        outputs.append(_output(kind, hidden))
    outputs.reverse()
    return torch.cat(outputs, 0), hidden


def _layers(kind: str, args: tuple, act: Act, linear: Linear, deferred: bool, pair: Pair | None, rescale: bool) -> Any:
    """A fused layer call (``torch.lstm(input, hx, params, has_biases, num_layers, dropout, train,
    bidirectional, batch_first)`` or the packed form with ``batch_sizes`` after the input)."""
    if len(args) != 9:
        return NotImplemented
    packed = isinstance(args[3], (list, tuple))
    if packed:
        data, batch_sizes_t, hx, flat, has_biases, num_layers, dropout, train, bidirectional = args
        batch_first = False
        if not isinstance(batch_sizes_t, Tensor):
            return NotImplemented
        batch_sizes: list[int] | None = [int(b) for b in batch_sizes_t.tolist()]
        schedule: Schedule | None = Schedule(batch_sizes, batch_sizes_t)  # (one for every layer and direction)
        x = data
    else:
        x, hx, flat, has_biases, num_layers, dropout, train, bidirectional, batch_first = args
        batch_sizes, schedule = None, None
        if not isinstance(x, Tensor) or x.dim() != 3:
            return NotImplemented
        if batch_first:
            x = x.transpose(0, 1)
    directions = 2 if bidirectional else 1
    count = num_layers * directions
    if not isinstance(flat, (list, tuple)) or not flat or len(flat) % count:
        return NotImplemented
    stride = len(flat) // count
    weights = [list(flat[k * stride:(k + 1) * stride]) for k in range(count)]  # per layer-direction
    if kind == "lstm":
        if not (isinstance(hx, (list, tuple)) and len(hx) == 2):
            return NotImplemented
        initial = list(zip(hx[0].unbind(0), hx[1].unbind(0)))
    else:
        if not isinstance(hx, Tensor):
            return NotImplemented
        initial = list(hx.unbind(0))
    finals: list = []
    for layer in range(num_layers):
        outs = []
        for d in range(directions):
            k = layer * directions + d
            # the gates (and projections) batched over time; AG-2 Linear (``rescale``), whose
            # rescaling goes call by call, takes a packed sequence's backward direction step by
            # step: each step's call there holds the sequences running at that time, the batched
            # route's step each sequence's k-th element from its end
            if linear is F.linear or (pair is not None and not (rescale and d == 1 and schedule is not None)):
                out, final = whole_sequence(kind, x, initial[k], weights[k], bool(has_biases), act, d == 1, deferred,
                                            schedule, pair)
            else:
                p = _Weights(weights[k], bool(has_biases))
                out, final = _direction(kind, linear(x, p.w_ih, p.b_ih), initial[k], p, act, linear, d == 1, batch_sizes)
            outs.append(out)
            finals.append(final)
        x = outs[0] if directions == 1 else torch.cat(outs, outs[0].dim() - 1)
        if dropout and train and layer < num_layers - 1:
            x = torch.dropout(x, dropout, True)
    if batch_first:
        x = x.transpose(0, 1)
    if kind == "lstm":
        return x, torch.stack([h for h, _ in finals], 0), torch.stack([c for _, c in finals], 0)
    return x, torch.stack(finals, 0)


def _cell(kind: str, args: tuple, kwargs: dict, act: Act, linear: Linear) -> Any:
    """A fused cell call (``torch.lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None)``)."""
    names = ("input", "hx", "w_ih", "w_hh", "b_ih", "b_hh")
    if len(args) > len(names) or any(k not in names for k in kwargs):
        return NotImplemented
    bound = dict(zip(names, args))
    bound.update(kwargs)
    x, hx = bound.get("input"), bound.get("hx")
    if not isinstance(x, Tensor) or x.dim() != 2 or hx is None:
        return NotImplemented
    if kind == "lstm":
        if not (isinstance(hx, (list, tuple)) and len(hx) == 2):
            return NotImplemented
        hx = (hx[0], hx[1])
    b_ih, b_hh = bound.get("b_ih"), bound.get("b_hh")
    p = _Weights([bound["w_ih"], bound["w_hh"], b_ih, b_hh], True)
    return _cell_step(kind, linear(x, p.w_ih, p.b_ih), hx, p, act, linear)


def unfused(func: Any, args: tuple, kwargs: dict, act: Act, linear: Linear = F.linear, deferred: bool = False,
            pair: Pair | None = None, rescale: bool = False) -> Any:
    """The fused recurrent call ``func(*args, **kwargs)`` taken apart, each gate's activation
    through ``act(function, input)`` and each projection through ``linear(input, weight, bias)``
    (step by step) or ``pair`` (the Linear variant's sites of a layer's projections batched over
    time: :data:`ttadapt.recurrent_sequence.Pair`); ``deferred``: the sites are AG-1 / AG-2's
    graph-pass sites (see :mod:`ttadapt.recurrent_sequence`); ``rescale``: AG-2 Linear's.
    ``NotImplemented`` where it does not apply (see the module docstring)."""
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        return NotImplemented
    if torch.is_autocast_enabled(x.device.type):
        return NotImplemented
    if func in _CELLS:
        return _cell(_CELLS[func], args, kwargs, act, linear)
    if kwargs:
        return NotImplemented
    return _layers(_LAYERS[func], args, act, linear, deferred, pair, rescale)
