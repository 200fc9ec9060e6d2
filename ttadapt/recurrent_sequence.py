"""A recurrent layer's whole sequence at once: the fused call's values, the gates' sites batched
over time, and backpropagation through time by hand with the sites' slopes.

:mod:`ttadapt.recurrent` takes a fused recurrent call apart step by step, so that autograd
records every step's operations: correct, but a 20-step LSTM's averaged step then costs about
four plain (fused) steps, most of it autograd's many small nodes. For one direction of one
layer over a padded sequence (no ``proj_size``, not the Linear variant) this module does the
same arithmetic in far fewer calls:

* **values** — the fused call itself for that layer and direction (``torch.lstm(..., num_layers=1)``
  on the sequence, reversed for the backward direction), whose outputs are the layer's output;
  from them the pre-activations of every step at once, ``x W_ihᵀ + b_ih + h_{t−1} W_hhᵀ + b_hh``
  with ``h_{t−1}`` the fused call's previous output (two matrix products), and for the LSTM the
  cell states by a scan ``c_t = f_t·c_{t−1} + i_t·g_t``;
* **sites** — one per gate over all steps (LSTM: i, f, g, o, then tanh(c); GRU: r, z, n; RNN:
  the one activation), called through the session as any activation; both passes of a step
  make the same calls, so they pair;
* **backward** — :class:`_Sequence`, an autograd function whose backward walks the steps in
  reverse with each gate's slope in place of its derivative, then forms the weight gradients of
  all steps in two matrix products. A slope is read from its site as the gradient of the site's
  output for a gradient of ones: at once where the other state is known (the site's graph and
  input are then freed), in the backward for AG-1 / AG-2's deferred sites, once filled.

The gradient is the step-by-step route's to rounding (tests/test_recurrent.py): the
pre-activations come from the fused call's outputs instead of the route's own, the sums over
steps are formed in another order. At the same state every slope is the derivative, and it is
the ordinary gradient.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["whole_sequence"]

Act = Callable[[Callable, Tensor], Tensor]


def _fused(kind: str, x: Tensor, h0: Tensor, c0: Tensor | None, w: list[Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
    """The fused call over ``x`` (time, batch, features) for one layer and direction:
    (outputs, final hidden, final cell or None)."""
    has_biases = len(w) == 4
    if kind == "lstm":
        out, hn, cn = torch.lstm(x, (h0[None], c0[None]), w, has_biases, 1, 0.0, False, False, False)
        return out, hn[0], cn[0]
    out, hn = getattr(torch, kind)(x, h0[None], w, has_biases, 1, 0.0, False, False, False)
    return out, hn[0], None


class _Gates:
    """What one layer-direction's forward leaves its backward: the gates' values and slopes."""

    def __init__(self, deferred: bool = False) -> None:
        self.deferred = deferred  # AG-1 / AG-2's graph pass: the slopes are known only in the backward
        self.sites: list[tuple[Tensor, Tensor]] = []  # deferred: (site input leaf, site output) per gate, call order
        self.slopes: list[Tensor] = []  # otherwise: each gate's slope, call order
        self.values: dict[str, Tensor] = {}


def _slope(leaf: Tensor, y: Tensor, retain: bool) -> Tensor:
    """A site's slope: the gradient of its output for a gradient of ones."""
    if y.grad_fn is None:
        raise RuntimeError("a recurrent gate's site recorded no graph")
    return torch.autograd.grad(y, leaf, torch.ones_like(y), retain_graph=retain)[0]


def _site(act: Act, f: Callable, u: Tensor, gates: _Gates, graph: bool) -> Tensor:
    """One batched site: its output's values; with ``graph``, the site is called on a leaf that
    requires a gradient and its slope read at once — or, for a deferred site, the pair kept to
    read it in the backward."""
    if not graph:
        return act(f, u)
    leaf = u.detach().requires_grad_(True)
    with torch.enable_grad():
        y = act(f, leaf)
    if gates.deferred:
        gates.sites.append((leaf, y))
    else:  # (the site's graph and its input are freed now: only the slope is held)
        gates.slopes.append(_slope(leaf, y, retain=False))
    return y.detach()


def _forward(kind: str, x: Tensor, h0: Tensor, c0: Tensor | None, w: list[Tensor], act: Act,
             graph: bool, deferred: bool = False) -> tuple[tuple[Tensor, ...], _Gates]:
    """Values and sites of one layer-direction over ``x`` in processing order (see the module
    docstring); no autograd graph but the sites'."""
    gates = _Gates(deferred)
    with torch.no_grad():
        out, hn, cn = _fused(kind, x, h0, c0, w)
        h_prev = torch.cat([h0[None], out[:-1]])
        b_ih, b_hh = (w[2], w[3]) if len(w) == 4 else (None, None)
        gx, gh = F.linear(x, w[0], b_ih), F.linear(h_prev, w[1], b_hh)
    v = gates.values
    v["x"], v["h_prev"] = x, h_prev
    if kind == "lstm":
        with torch.no_grad():
            ui, uf, ug, uo = (u.contiguous() for u in (gx + gh).chunk(4, -1))
        i, f = _site(act, torch.sigmoid, ui, gates, graph), _site(act, torch.sigmoid, uf, gates, graph)
        g, o = _site(act, torch.tanh, ug, gates, graph), _site(act, torch.sigmoid, uo, gates, graph)
        with torch.no_grad():
            cells = torch.empty_like(i)
            c = c0
            for t in range(x.shape[0]):
                c = torch.add(f[t] * c, i[t] * g[t], out=cells[t])
            c_prev = torch.cat([c0[None], cells[:-1]])
        tc = _site(act, torch.tanh, cells, gates, graph)
        v.update(i=i, f=f, g=g, o=o, c_prev=c_prev, tc=tc)
        return (out, hn, cn), gates
    if kind == "gru":
        with torch.no_grad():
            xr, xz, xn = gx.chunk(3, -1)
            hr, hz, hn_ = gh.chunk(3, -1)
            ur, uz = hr + xr, hz + xz
        r = _site(act, torch.sigmoid, ur, gates, graph)
        z = _site(act, torch.sigmoid, uz, gates, graph)
        with torch.no_grad():
            un = xn + hn_ * r
        n = _site(act, torch.tanh, un, gates, graph)
        v.update(r=r, z=z, n=n, gh_n=hn_.contiguous())
        return (out, hn), gates
    with torch.no_grad():
        u = gh + gx
    _site(act, torch.relu if kind == "rnn_relu" else torch.tanh, u, gates, graph)
    return (out, hn), gates


def _slopes(gates: _Gates) -> list[Tensor]:
    """Each gate's slope. A deferred site's is read now, from its filled slot; retain_graph:
    AG-1 / AG-2 run the graph pass's backward twice — ordinary, then averaged once the other
    state's inputs fill the sites — and the sites' graphs go with this function's node."""
    if not gates.deferred:
        return gates.slopes
    return [_slope(leaf, y, retain=True) for leaf, y in gates.sites]


def _backprop(kind: str, gates: _Gates, w_hh: Tensor, d_out: Tensor | None, dh: Tensor, dc: Tensor | None):
    """Backpropagation through time with the slopes: (dL/d pre-activations from the input side,
    from the hidden side, (T, B, k·H) each, in processing order; dL/dh0; dL/dc0). The products
    that do not depend on the incoming gradient are formed for all steps at once before the
    walk, which is left with a few operations and one matrix product per step."""
    v = gates.values
    slopes = _slopes(gates)
    steps = v["x"].shape[0]
    if kind == "lstm":
        s_i, s_f, s_g, s_o, s_c = slopes
        i, f, g, o, c_prev, tc = (v[k] for k in ("i", "f", "g", "o", "c_prev", "tc"))
        # h = o·tanh(c), c = f·c₋ + i·g: per step dL/du_{i,f,g} = dc·(g·s_i, c₋·s_f, i·s_g),
        # dL/du_o = dh·tanh(c)·s_o, dc += dh·o·s_c, and dc₋ = dc·f
        cell_factors = torch.stack([g * s_i, c_prev * s_f, i * s_g], 2)  # (T, B, 3, H)
        out_factor, cell_from_h = tc * s_o, o * s_c
        d_pre = torch.empty(i.shape[:-1] + (4, i.shape[-1]), dtype=i.dtype, device=i.device)  # (T, B, 4, H)
        flat = d_pre.flatten(2)
        for t in range(steps - 1, -1, -1):
            dh_t = dh if d_out is None else dh + d_out[t]
            torch.mul(dh_t, out_factor[t], out=d_pre[t, :, 3])
            dc = torch.addcmul(dc, dh_t, cell_from_h[t])
            torch.mul(dc.unsqueeze(1), cell_factors[t], out=d_pre[t, :, :3])
            dc = dc * f[t]
            dh = flat[t] @ w_hh
        return flat, flat, dh, dc
    if kind == "gru":
        s_r, s_z, s_n = slopes
        r, z, n, gh_n, h_prev = (v[k] for k in ("r", "z", "n", "gh_n", "h_prev"))
        # h = (h₋ − n)·z + n, n = tanh(x_n + r·gh_n): dL/du_n = dh·(1 − z)·s_n, dL/dgh_n = dL/du_n·r,
        # dL/du_r = dL/du_n·gh_n·s_r, dL/du_z = dh·(h₋ − n)·s_z, dh₋ = dh·z + (hidden side)·W_hh
        n_factor, r_factor, z_factor = (1 - z) * s_n, gh_n * s_r, (h_prev - n) * s_z
        hidden = r.shape[-1]
        shape = r.shape[:-1] + (3 * hidden,)
        d_x = torch.empty(shape, dtype=r.dtype, device=r.device)
        d_h = torch.empty_like(d_x)
        for t in range(steps - 1, -1, -1):
            dh_t = dh if d_out is None else dh + d_out[t]
            du_n = torch.mul(dh_t, n_factor[t], out=d_x[t, :, 2 * hidden:])
            torch.mul(du_n, r[t], out=d_h[t, :, 2 * hidden:])
            torch.mul(du_n, r_factor[t], out=d_x[t, :, :hidden])
            torch.mul(dh_t, z_factor[t], out=d_x[t, :, hidden:2 * hidden])
            d_h[t, :, :2 * hidden] = d_x[t, :, :2 * hidden]
            dh = torch.addmm(dh_t * z[t], d_h[t], w_hh)
        return d_x, d_h, dh, None
    (s,) = slopes
    d_pre = torch.empty_like(s)
    for t in range(steps - 1, -1, -1):
        dh_t = dh if d_out is None else dh + d_out[t]
        dh = torch.mul(dh_t, s[t], out=d_pre[t]) @ w_hh
    return d_pre, d_pre, dh, None


class _Sequence(torch.autograd.Function):
    """One layer-direction over a padded sequence: forward is :func:`_forward`'s values (the fused
    call's outputs), backward :func:`_backprop` with the gates' slopes."""

    @staticmethod
    def forward(ctx: Any, spec: tuple, x: Tensor, h0: Tensor, c0: Tensor | None, *w: Tensor):  # type: ignore[override]
        kind, act, deferred = spec
        outputs, gates = _forward(kind, x, h0, c0, list(w), act, True, deferred)
        ctx.kind, ctx.gates, ctx.has_biases = kind, gates, len(w) == 4
        ctx.save_for_backward(*w)
        return outputs

    @staticmethod
    def backward(ctx: Any, d_out: Tensor | None, d_hn: Tensor | None, d_cn: Tensor | None = None):  # type: ignore[override]
        w = ctx.saved_tensors
        gates, kind = ctx.gates, ctx.kind
        v = gates.values
        x, h_prev = v["x"], v["h_prev"]
        dh = d_hn if d_hn is not None else torch.zeros_like(h_prev[0])
        dc = None
        if kind == "lstm":
            dc = d_cn if d_cn is not None else torch.zeros_like(h_prev[0])
        d_x, d_h, dh0, dc0 = _backprop(kind, gates, w[1], d_out, dh, dc)
        needs = ctx.needs_input_grad
        grads: list[Tensor | None] = [None, None, dh0 if needs[2] else None, dc0 if needs[3] else None]
        flat_x, flat_h = d_x.flatten(0, 1), d_h.flatten(0, 1)
        grads[1] = d_x @ w[0] if needs[1] else None
        grads.append(flat_x.t() @ x.flatten(0, 1) if needs[4] else None)
        grads.append(flat_h.t() @ h_prev.flatten(0, 1) if needs[5] else None)
        if ctx.has_biases:
            grads.append(flat_x.sum(0) if needs[6] else None)
            grads.append(flat_h.sum(0) if needs[7] else None)
        return tuple(grads)


def whole_sequence(kind: str, x: Tensor, hidden: Any, w: list[Tensor], act: Act, reverse: bool,
                   deferred: bool = False) -> tuple[Tensor, Any]:
    """One layer in one direction over a padded sequence ``x`` (time, batch, features), the
    gates batched over time: (outputs, final hidden — a pair for the LSTM), as
    :func:`ttadapt.recurrent._direction` returns them. ``deferred``: the sites are AG-1 / AG-2's
    graph-pass sites, whose slopes are known only once filled."""
    h0, c0 = hidden if kind == "lstm" else (hidden, None)
    xs = x.flip(0) if reverse else x
    graph = torch.is_grad_enabled() and any(t.requires_grad for t in (xs, h0, c0, *w) if t is not None)
    if graph:
        outputs = _Sequence.apply((kind, act, deferred), xs, h0, c0, *w)
    else:
        outputs, _ = _forward(kind, xs, h0, c0, w, act, False)
    out = outputs[0].flip(0) if reverse else outputs[0]
    return out, ((outputs[1], outputs[2]) if kind == "lstm" else outputs[1])
