"""A recurrent layer's whole sequence at once: the fused call's values, the gates' sites batched
over time, and backpropagation through time by hand with the sites' slopes.

:mod:`ttadapt.recurrent` takes a fused recurrent call apart step by step, so that autograd
records every step's operations: correct, but a 20-step LSTM's averaged step then costs about
four plain (fused) steps, most of it autograd's many small nodes. For one direction of one
layer, padded or packed, this module does the same
arithmetic in far fewer calls. A sequence is held as *rows* (one per sequence and step,
time-major, as a packed sequence's data: a padded (time, batch) sequence is the case of equal
batch sizes) and a :class:`Schedule` — the rows of each step, whose count may only shrink as
sequences end; the backward direction runs each sequence reversed (a permutation of the rows),
so it is the forward direction's case too:

* **values** — the fused call itself for that layer and direction (``torch.lstm(...,
  num_layers=1)``), whose outputs are the layer's output; from them the pre-activations of every
  row at once, ``x W_ihᵀ + b_ih + h₋ W_hhᵀ + b_hh`` with ``h₋`` the row's previous output (two
  matrix products), and for the LSTM the cell states by a scan ``c_t = f_t·c_{t−1} + i_t·g_t``;
* **sites** — one per gate over all rows (LSTM: i, f, g, o, then tanh(c); GRU: r, z, n; RNN:
  the one activation), called through the session as any activation; both passes of a step
  make the same calls, so they pair (with ``proj_size`` the LSTM's output is ``W_hr·(o·tanh c)``,
  which the backward takes through ``W_hr``);
* **the Linear variant** — the input projection of all rows, the hidden projection of all rows
  and an LSTM's output projection are one affine site each (:class:`Projection`); the backward
  takes each through the two states' mean weight (the input side) and mean input (the weight
  side). AG-2 Linear rescales each affine call's gradients to the ordinary ones' norms, and the
  step-by-step route calls the hidden and output projections once per step: its ordinary
  backward notes those norms per step (the walk's gradient through each step's call, each
  step's weight and bias gradients), its averaged backward rescales to them, so the two routes
  agree (a packed sequence's backward direction, whose steps group other rows, stays step by
  step under it);
* **backward** — :class:`_Sequence`, an autograd function whose backward walks the steps in
  reverse with each gate's slope in place of its derivative (a sequence that has ended keeps its
  final state's gradient until the walk reaches its last step), then forms the weight gradients
  of all rows in two matrix products. A slope is read from its site as the gradient of the
  site's output for a gradient of ones: at once where the other state is known (the site's
  graph and input are then freed), in the backward for AG-1 / AG-2's deferred sites, once filled.

The gradient is the step-by-step route's to rounding (tests/test_recurrent.py): the
pre-activations come from the fused call's outputs instead of the route's own, the sums over
steps are formed in another order. At the same state every slope is the derivative, and it is
the ordinary gradient.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .deferred import joint_norm, rescale_to

__all__ = ["Schedule", "whole_sequence", "split_weights"]

Act = Callable[[Callable, Tensor], Tensor]


class Projection:
    """The Linear variant's affine site of one projection ``u Wᵀ`` over all rows (a layer's
    input, hidden or output projection), as the session hands it to the graph pass.

    ``take()`` gives ``(u, W)`` at the other state, once, for the backward — None while AG-1 /
    AG-2's deferred site waits (their first, ordinary backward); ``rescale``: AG-2 Linear, which
    rescales each affine call's input and parameter gradients to the ordinary ones' norms."""

    __slots__ = ("take", "rescale")

    def __init__(self, take: Callable[[], "tuple[Tensor, Tensor] | None"], rescale: bool = False) -> None:
        self.take, self.rescale = take, rescale


# The session's hook for those sites: called with ``(u, W)`` in call order in both passes, it
# returns the graph pass's :class:`Projection`, or None (the pass at the other state, inspect).
Pair = Callable[[Tensor, Tensor], "Projection | None"]


def split_weights(w: Sequence[Tensor], has_biases: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """``(W_ih, W_hh, b_ih, b_hh, W_hr)`` from the fused call's flat list of one layer-direction
    (``W_hr``: an LSTM's ``proj_size`` projection, else None)."""
    b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
    rest = w[4:] if has_biases else w[2:]
    return w[0], w[1], b_ih, b_hh, (rest[0] if rest else None)


class Schedule:
    """Which rows hold each step: step ``t`` is rows ``offsets[t] : offsets[t] + sizes[t]``, sizes
    non-increasing (the first ``sizes[t]`` sequences are still running); ``padded`` when all
    sizes are equal, ``batch_sizes`` the packed sequence's tensor otherwise."""

    def __init__(self, sizes: list[int], batch_sizes: Tensor | None) -> None:
        self.sizes, self.batch_sizes = sizes, batch_sizes
        self.offsets = [0]
        for size in sizes[:-1]:
            self.offsets.append(self.offsets[-1] + size)
        self.rows, self.batch, self.steps = sum(sizes), sizes[0], len(sizes)
        self.padded = batch_sizes is None
        self._previous: Tensor | None = None
        self._reversal: Tensor | None = None
        self._grid: Tensor | None = None

    def previous(self, device: torch.device) -> Tensor:
        """For every row past the first step, the row of the same sequence one step earlier."""
        if self._previous is None:  # row offsets[t − 1] + j for step t ≥ 1 and j < sizes[t]
            self._previous = _runs(self.offsets[:-1], self.sizes[1:])
        return self._previous.to(device)

    def reversal(self, device: torch.device) -> Tensor:
        """A packed sequence's :func:`reversal` (worked out once per schedule)."""
        if self._reversal is None:
            self._reversal = reversal(self.batch_sizes)
        return self._reversal.to(device)

    def grid(self, rows: Tensor) -> Tensor:
        """``rows`` (one per sequence and step) as a (steps, batch, ·) grid, zeros where a
        sequence has ended."""
        if self.padded:
            return rows.view(self.steps, self.batch, -1)
        if self._grid is None:  # row offsets[t] + j goes to t·batch + j
            self._grid = _runs([t * self.batch for t in range(self.steps)], self.sizes)
        grid = rows.new_zeros(self.steps * self.batch, rows.shape[-1])
        return grid.index_copy_(0, self._grid.to(rows.device), rows).view(self.steps, self.batch, -1)

    def earlier(self, h0: Tensor, rows: Tensor) -> Tensor:
        """Each row's state one step earlier: ``h0`` for the first step, else ``rows``' row."""
        if self.padded:
            return torch.cat([h0, rows[:self.rows - self.batch]])
        return torch.cat([h0[:self.sizes[0]], rows.index_select(0, self.previous(rows.device))])


def _runs(starts: list[int], sizes: list[int]) -> Tensor:
    """``starts[t] + j`` for every ``t`` and ``j < sizes[t]``, in that order (int64)."""
    counts = torch.tensor(sizes, dtype=torch.long)
    first = torch.cumsum(counts, 0) - counts  # each run's first position in the result
    within = torch.arange(int(counts.sum())) - torch.repeat_interleave(first, counts)
    return torch.repeat_interleave(torch.tensor(starts, dtype=torch.long), counts) + within


def reversal(batch_sizes: Tensor) -> Tensor:
    """The permutation of a packed sequence's rows that reverses every sequence in time (its own
    inverse): row (t, b) goes to (L_b − 1 − t, b)."""
    sizes = batch_sizes.to(torch.long)
    steps, batch = len(sizes), int(sizes[0])
    offsets = torch.cumsum(sizes, 0) - sizes
    t = torch.arange(steps).unsqueeze(1).expand(steps, batch)
    b = torch.arange(batch).unsqueeze(0).expand(steps, batch)
    valid = b < sizes.unsqueeze(1)
    lengths = valid.sum(0)
    return (offsets[lengths[b] - 1 - t] + b)[valid]


def _fused(kind: str, x: Tensor, schedule: Schedule, h0: Tensor, c0: Tensor | None, w: list[Tensor],
           has_biases: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """The fused call over the rows ``x`` for one layer and direction: (output rows, final
    hidden, final cell or None)."""
    hidden: Any = (h0[None], c0[None]) if kind == "lstm" else h0[None]
    if schedule.padded:
        args = (x.view(schedule.steps, schedule.batch, x.shape[-1]), hidden, w, has_biases, 1, 0.0, False, False, False)
    else:
        args = (x, schedule.batch_sizes, hidden, w, has_biases, 1, 0.0, False, False)
    result = getattr(torch, kind)(*args)
    out = result[0].reshape(schedule.rows, -1)
    return out, result[1][0], (result[2][0] if kind == "lstm" else None)


class _Gates:
    """What one layer-direction's forward leaves its backward: the gates' values and slopes."""

    def __init__(self, deferred: bool = False) -> None:
        self.deferred = deferred  # AG-1 / AG-2's graph pass: the slopes are known only in the backward
        self.sites: list[tuple[Tensor, Tensor]] = []  # deferred: (site input leaf, site output) per gate, call order
        self.slopes: list[Tensor] = []  # otherwise: each gate's slope, call order
        self.values: dict[str, Tensor] = {}
        self.others: dict[str, Projection] = {}  # the Linear variant: "ih", "hh" (and "hr") projection sites
        self.norms: dict[str, Any] = {}  # AG-2 Linear: the ordinary backward's norms, per site (and step)


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


def _pair(pair: Pair | None, gates: _Gates, key: str, u: Tensor, w: Tensor, graph: bool) -> None:
    """The Linear variant: the projection ``u wᵀ`` as an affine site (see :data:`Pair`); with
    ``graph`` (inside :class:`_Sequence`'s forward, where recording is off) called with recording
    on, as the layer's own call ran, else in the caller's mode."""
    if pair is not None:
        with torch.set_grad_enabled(graph or torch.is_grad_enabled()):
            other = pair(u, w)
        if other is not None:
            gates.others[key] = other


def _forward(kind: str, x: Tensor, schedule: Schedule, h0: Tensor, c0: Tensor | None, w: list[Tensor],
             has_biases: bool, act: Act, graph: bool, deferred: bool = False,
             pair: Pair | None = None) -> tuple[tuple[Tensor, ...], _Gates]:
    """Values and sites of one layer-direction over the rows ``x`` (see the module docstring);
    no autograd graph but the sites'. With ``pair`` (the Linear variant) the input and hidden
    projections of all rows, and an LSTM's output projection, are affine sites too."""
    gates = _Gates(deferred)
    w_ih, w_hh, b_ih, b_hh, w_hr = split_weights(w, has_biases)
    with torch.no_grad():
        out, hn, cn = _fused(kind, x, schedule, h0, c0, w, has_biases)
        h_prev = schedule.earlier(h0, out)
        gx, gh = F.linear(x, w_ih, b_ih), F.linear(h_prev, w_hh, b_hh)
    _pair(pair, gates, "ih", x, w_ih, graph)
    _pair(pair, gates, "hh", h_prev, w_hh, graph)
    v = gates.values
    v["h_prev"] = h_prev
    if kind == "lstm":
        with torch.no_grad():
            ui, uf, ug, uo = (u.contiguous() for u in (gx + gh).chunk(4, -1))
        i, f = _site(act, torch.sigmoid, ui, gates, graph), _site(act, torch.sigmoid, uf, gates, graph)
        g, o = _site(act, torch.tanh, ug, gates, graph), _site(act, torch.sigmoid, uo, gates, graph)
        with torch.no_grad():
            cells = torch.empty_like(i)
            c = c0
            for start, size in zip(schedule.offsets, schedule.sizes):
                rows = slice(start, start + size)
                c = torch.add(f[rows] * c[:size], i[rows] * g[rows], out=cells[rows])
            c_prev = schedule.earlier(c0, cells)
        tc = _site(act, torch.tanh, cells, gates, graph)
        v.update(i=i, f=f, g=g, o=o, c_prev=c_prev, tc=tc)
        if w_hr is not None:  # the output before its projection (proj_size)
            v["m"] = o * tc
            _pair(pair, gates, "hr", v["m"], w_hr, graph)
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


def _carry(new: Tensor, carried: Tensor, size: int) -> Tensor:
    """The gradient carried to the step before: ``new`` for the sequences running there, the
    rest (sequences that ended earlier: their final state's gradient) as it was."""
    return new if size == carried.shape[0] else torch.cat([new, carried[size:]])


Scale = Callable[[int, Tensor], Tensor]  # AG-2 Linear: (step, a projection's input gradient there) -> it, noted or rescaled


def _backprop(kind: str, gates: _Gates, schedule: Schedule, w_hh: Tensor, d_out: Tensor, dh: Tensor,
              dc: Tensor | None, w_hr: Tensor | None = None, scale_hh: Scale | None = None,
              scale_hr: Scale | None = None):
    """Backpropagation through time with the slopes: (dL/d pre-activations from the input side,
    from the hidden side, one row per sequence and step each; dL/dh0; dL/dc0; with an LSTM's
    projection ``w_hr``, dL/d(projected output) per row, else None). The products that do not
    depend on the incoming gradient are formed for all rows at once before the walk, which is
    left with a few operations and one matrix product per step (two with the projection).
    ``scale_hh`` / ``scale_hr``: AG-2 Linear's handling of each step's gradient through the
    hidden / output projection (that step's call of it)."""
    v = gates.values
    slopes = _slopes(gates)
    walk = [(t, size, slice(start, start + size))
            for t, (start, size) in enumerate(zip(schedule.offsets, schedule.sizes))][::-1]
    if kind == "lstm":
        s_i, s_f, s_g, s_o, s_c = slopes
        i, f, g, o, c_prev, tc = (v[k] for k in ("i", "f", "g", "o", "c_prev", "tc"))
        # h = o·tanh(c), c = f·c₋ + i·g: per step dL/du_{i,f,g} = dc·(g·s_i, c₋·s_f, i·s_g),
        # dL/du_o = dh·tanh(c)·s_o, dc += dh·o·s_c, and dc₋ = dc·f
        cell_factors = torch.stack([g * s_i, c_prev * s_f, i * s_g], 1)  # (rows, 3, H)
        out_factor, cell_from_h = tc * s_o, o * s_c
        d_pre = torch.empty((i.shape[0], 4, i.shape[-1]), dtype=i.dtype, device=i.device)  # (rows, 4, H)
        flat = d_pre.flatten(1)
        d_proj = None if w_hr is None else torch.empty_like(d_out)  # h = W_hr·(o·tanh c): dL/dh per row
        for t, size, rows in walk:
            dh_t = dh[:size] + d_out[rows]
            if d_proj is not None:
                d_proj[rows] = dh_t
                dh_t = dh_t @ w_hr
                if scale_hr is not None:
                    dh_t = scale_hr(t, dh_t)
            torch.mul(dh_t, out_factor[rows], out=d_pre[rows, 3])
            dc_t = torch.addcmul(dc[:size], dh_t, cell_from_h[rows])
            torch.mul(dc_t.unsqueeze(1), cell_factors[rows], out=d_pre[rows, :3])
            dc = _carry(dc_t * f[rows], dc, size)
            dh_prev = flat[rows] @ w_hh
            dh = _carry(dh_prev if scale_hh is None else scale_hh(t, dh_prev), dh, size)
        return flat, flat, dh, dc, d_proj
    if kind == "gru":
        s_r, s_z, s_n = slopes
        r, z, n, gh_n, h_prev = (v[k] for k in ("r", "z", "n", "gh_n", "h_prev"))
        # h = (h₋ − n)·z + n, n = tanh(x_n + r·gh_n): dL/du_n = dh·(1 − z)·s_n, dL/dgh_n = dL/du_n·r,
        # dL/du_r = dL/du_n·gh_n·s_r, dL/du_z = dh·(h₋ − n)·s_z, dh₋ = dh·z + (hidden side)·W_hh
        n_factor, r_factor, z_factor = (1 - z) * s_n, gh_n * s_r, (h_prev - n) * s_z
        hidden = r.shape[-1]
        d_x = torch.empty((r.shape[0], 3 * hidden), dtype=r.dtype, device=r.device)
        d_h = torch.empty_like(d_x)
        for t, size, rows in walk:
            dh_t = dh[:size] + d_out[rows]
            du_n = torch.mul(dh_t, n_factor[rows], out=d_x[rows, 2 * hidden:])
            torch.mul(du_n, r[rows], out=d_h[rows, 2 * hidden:])
            torch.mul(du_n, r_factor[rows], out=d_x[rows, :hidden])
            torch.mul(dh_t, z_factor[rows], out=d_x[rows, hidden:2 * hidden])
            d_h[rows, :2 * hidden] = d_x[rows, :2 * hidden]
            if scale_hh is None:
                dh_prev = torch.addmm(dh_t * z[rows], d_h[rows], w_hh)
            else:
                dh_prev = scale_hh(t, d_h[rows] @ w_hh).add_(dh_t * z[rows])
            dh = _carry(dh_prev, dh, size)
        return d_x, d_h, dh, None, None
    (s,) = slopes
    d_pre = torch.empty_like(s)
    for t, size, rows in walk:
        dh_t = dh[:size] + d_out[rows]
        dh_prev = torch.mul(dh_t, s[rows], out=d_pre[rows]) @ w_hh
        dh = _carry(dh_prev if scale_hh is None else scale_hh(t, dh_prev), dh, size)
    return d_pre, d_pre, dh, None, None


class _Sequence(torch.autograd.Function):
    """One layer-direction over the rows of a sequence: forward is :func:`_forward`'s values (the
    fused call's outputs), backward :func:`_backprop` with the gates' slopes."""

    @staticmethod
    def forward(ctx: Any, spec: tuple, x: Tensor, h0: Tensor, c0: Tensor | None, *w: Tensor):  # type: ignore[override]
        kind, schedule, has_biases, act, deferred, pair = spec
        outputs, gates = _forward(kind, x, schedule, h0, c0, list(w), has_biases, act, True, deferred, pair)
        ctx.kind, ctx.schedule, ctx.gates, ctx.has_biases = kind, schedule, gates, has_biases
        ctx.save_for_backward(x, *w)  # (x through autograd: modified in place before the backward, it is refused)
        return outputs

    @staticmethod
    def backward(ctx: Any, d_out: Tensor, d_hn: Tensor, d_cn: Tensor | None = None):  # type: ignore[override]
        x, *w = ctx.saved_tensors
        w_ih, w_hh, _, _, w_hr = split_weights(w, ctx.has_biases)
        gates, kind, schedule = ctx.gates, ctx.kind, ctx.schedule
        h_prev, m = gates.values["h_prev"], gates.values.get("m")
        needs, biases = ctx.needs_input_grad, ctx.has_biases
        w_slot = 6 + 2 * biases  # (w_hr's position among the inputs)
        # the Linear variant (Eq. 11): each projection's input gradient through the mean weight,
        # its weight gradient through the mean input (biases as they are). AG-2 Linear: its
        # ordinary backward (the sites still waiting) notes each call's gradient norms, its
        # averaged one rescales to them — the input projection one call, the hidden and output
        # projections one call per step, as the step-by-step route makes them
        others = {key: site.take() for key, site in gates.others.items()}
        rescale = None
        if any(site.rescale for site in gates.others.values()):
            rescale = "apply" if all(o is not None for o in others.values()) else "note"
        w_ih, x = _means(others.get("ih"), w_ih, x, needs[1], needs[4])
        w_hh, h_prev = _means(others.get("hh"), w_hh, h_prev, True, needs[5])
        if w_hr is not None:
            w_hr, m = _means(others.get("hr"), w_hr, m, True, needs[w_slot])
        norms = gates.norms
        d_x, d_h, dh0, dc0, d_proj = _backprop(kind, gates, schedule, w_hh, d_out, d_hn, d_cn, w_hr,
                                               _scaler(rescale, norms, "hh in"), _scaler(rescale, norms, "hr in"))
        g_x = d_x @ w_ih if needs[1] else None
        g_ih, gb_ih = (d_x.t() @ x if needs[4] else None), (d_x.sum(0) if biases and needs[6] else None)
        if rescale == "note":
            norms["ih"] = (joint_norm(g_x), joint_norm(g_ih, gb_ih))
        elif rescale == "apply" and "ih" in norms:
            rescale_to(norms["ih"][0], g_x)
            rescale_to(norms["ih"][1], g_ih, gb_ih)
        g_hh, gb_hh = _step_calls(rescale, norms, "hh", schedule, d_h, h_prev, needs[5], biases and needs[7])
        grads: list[Tensor | None] = [None, g_x, dh0 if needs[2] else None, dc0 if needs[3] else None, g_ih, g_hh]
        if biases:
            grads += [gb_ih, gb_hh]
        if w_hr is not None:
            grads.append(_step_calls(rescale, norms, "hr", schedule, d_proj, m, needs[w_slot], False)[0])
        return tuple(grads)


def _means(other: tuple[Tensor, Tensor] | None, w: Tensor, u: Tensor, mean_w: bool, mean_u: bool) -> tuple[Tensor, Tensor]:
    """``(w, u)``, each replaced by its mean with the other state's ``other = (u, w)`` where asked
    (a projection's Linear-variant site, once its other state is known)."""
    if other is None:
        return w, u
    u_other, w_other = other
    return (torch.add(w, w_other).mul_(0.5) if mean_w else w), (torch.add(u, u_other).mul_(0.5) if mean_u else u)


def _norm(t: Tensor) -> Tensor:
    """A tensor's L2 norm (half precision's in float32, which does not overflow)."""
    return torch.linalg.vector_norm(t, dtype=torch.float32 if t.element_size() < 4 else None)


def _factor(target: Tensor, now: Tensor) -> Tensor:
    """The factor that takes norms ``now`` to ``target`` (1 where ``now`` is 0: a zero gradient
    stays zero), as :func:`ttadapt.deferred.rescale_to` forms it."""
    return torch.where(now > 0, target / now, 1.0)


def _scaler(rescale: str | None, all_norms: dict[str, Any], key: str) -> Scale | None:
    """AG-2 Linear's handling of a projection's per-step input gradient: its norm noted under
    ``key`` (``"note"``, the ordinary backward) or the gradient rescaled in place to the noted
    norm (``"apply"``)."""
    if rescale is None:
        return None
    norms: dict[int, Tensor] = all_norms.setdefault(key, {})
    if rescale == "note":
        def note(t: int, g: Tensor) -> Tensor:
            norms[t] = _norm(g)
            return g

        return note
    if rescale == "apply":
        def apply(t: int, g: Tensor) -> Tensor:
            target = norms.get(t)
            return g if target is None else g.mul_(_factor(target, _norm(g)).to(g.dtype))

        return apply
    return None


def _step_calls(rescale: str | None, norms: dict[str, Tensor], key: str, schedule: Schedule, d: Tensor, u: Tensor,
                weight: bool, bias: bool) -> tuple[Tensor | None, Tensor | None]:
    """The weight and bias gradients of a projection called once per step (output gradients
    ``d``, inputs ``u``, one row per sequence and step): two products over all rows. AG-2 Linear
    (``rescale``) needs the joint norm of each step's pair: its ordinary backward (``"note"``)
    notes them under ``key``; its averaged backward (``"apply"``) scales each step's pair to its
    noted norm — each row of the product by its step's factor — before they are summed. The
    norms come from the steps' weight gradients formed as batched products, a chunk of steps at
    a time holding no more than ``d`` does (the rows of ended sequences as zeros)."""
    plain = (d.t() @ u if weight else None), (d.sum(0) if bias else None)
    target = norms.get(key)
    if rescale is None or not (weight or bias) or (rescale == "apply" and target is None):
        return plain
    d3 = schedule.grid(d)  # (steps, batch, ·)
    b_steps = d3.sum(1) if bias else None  # each step's bias gradient
    sq = _squared_norms(b_steps) if bias else d.new_zeros(schedule.steps, dtype=torch.float64)
    if weight:
        u3 = schedule.grid(u)
        chunk = max(1, d.numel() // (d.shape[1] * u.shape[1]))
        for start in range(0, schedule.steps, chunk):
            part = slice(start, start + chunk)
            sq[part] += _squared_norms(torch.bmm(d3[part].transpose(1, 2), u3[part]))
    if rescale == "note":
        norms[key] = sq.sqrt()
        return plain
    factor = _factor(target, sq.sqrt()).to(d.dtype)
    g_w = None
    if weight:  # (the narrower of the two scaled row by row)
        rows = factor.repeat_interleave(torch.tensor(schedule.sizes, device=factor.device), 0).unsqueeze(1)
        g_w = d.t() @ (u * rows) if u.shape[1] <= d.shape[1] else (d * rows).t() @ u
    return g_w, (torch.einsum("t,tj->j", factor, b_steps) if bias else None)


def _squared_norms(t: Tensor) -> Tensor:
    """The squared L2 norm of each ``t[k]``, in float64 (half precision's taken in float32)."""
    dtype = torch.float32 if t.element_size() < 4 else None
    return torch.linalg.vector_norm(t.flatten(1), dim=1, dtype=dtype).double().square()


def whole_sequence(kind: str, x: Tensor, hidden: Any, w: list[Tensor], has_biases: bool, act: Act, reverse: bool,
                   deferred: bool = False, packed: Schedule | None = None, pair: Pair | None = None) -> tuple[Tensor, Any]:
    """One layer in one direction, the gates batched over time: (outputs, final hidden — a pair
    for the LSTM), as :func:`ttadapt.recurrent._direction` returns them. ``w`` is the layer
    direction's part of the fused call's flat weight list. ``x`` is a padded sequence (time,
    batch, features), or with ``packed`` (the packed sequence's schedule, shared by the call's
    layers and directions) a packed sequence's data. ``deferred``: the sites are AG-1 / AG-2's
    graph-pass sites, whose slopes are known only once filled. ``pair``: the Linear variant's
    affine sites (:data:`Pair`)."""
    h0, c0 = hidden if kind == "lstm" else (hidden, None)
    order = None
    if packed is None:
        steps, batch = x.shape[0], x.shape[1]
        schedule = Schedule([batch] * steps, None)
        rows = (x.flip(0) if reverse else x).reshape(steps * batch, x.shape[-1])
    else:
        schedule = packed
        order = schedule.reversal(x.device) if reverse else None
        rows = x if order is None else x.index_select(0, order)
    graph = torch.is_grad_enabled() and any(t.requires_grad for t in (rows, h0, c0, *w) if t is not None)
    if graph:
        outputs = _Sequence.apply((kind, schedule, has_biases, act, deferred, pair), rows, h0, c0, *w)
    else:
        outputs, _ = _forward(kind, rows, schedule, h0, c0, w, has_biases, act, False, pair=pair)
    out = outputs[0]
    if packed is None:
        out = out.view(schedule.steps, schedule.batch, -1)
        out = out.flip(0) if reverse else out
    elif order is not None:
        out = out.index_select(0, order)
    return out, ((outputs[1], outputs[2]) if kind == "lstm" else outputs[1])
