"""Recurrent layers (nn.LSTM, nn.GRU, nn.RNN and their cells): their gates are averaged sites.

Oracles: the fused ATen call (the step-by-step route must give its outputs), plain autograd (the
averaged gradient at the same state), a textbook loop-written twin built of calls the engine
already averages (same weights, same averaged gradient), and the exact path average by
quadrature where the secant is exact (one tanh step from a zero state, a linear loss).
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.overrides import TorchFunctionMode

import ttadapt
from ttadapt import recurrent, sites

KINDS = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}


class _Unfuse(TorchFunctionMode):
    """Every fused recurrent call step by step, activations called plainly."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if recurrent.fused_kind(func) is not None:
            out = recurrent.unfused(func, args, kwargs, lambda f, u: f(u))
            assert out is not NotImplemented
            return out
        return func(*args, **kwargs)


def _max_diff(a, b) -> float:
    if isinstance(a, torch.Tensor):
        return (a - b).abs().max().item()
    if hasattr(a, "batch_sizes"):
        assert torch.equal(a.batch_sizes, b.batch_sizes)
        return _max_diff(a.data, b.data)
    return max(_max_diff(x, y) for x, y in zip(a, b))


CONFIGS = [
    (kind, layers, bidirectional, batch_first, bias, proj, packed)
    for kind, layers, bidirectional, batch_first, bias, proj, packed in itertools.product(
        KINDS, (1, 2), (False, True), (False, True), (True, False), (0, 3), (False, True))
    if not (proj and kind != "LSTM")
]


def _layer(kind: str, layers: int, bidirectional: bool, batch_first: bool, bias: bool, proj: int, dtype, **kw) -> nn.Module:
    extra = {"proj_size": proj} if proj else {}
    return KINDS[kind](5, 4, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias,
                       **extra, **kw).to(dtype)


def _inputs(batch_first: bool, packed: bool, dtype):
    x = torch.randn(3, 6, 5, dtype=dtype)  # (batch, time, features)
    if packed:
        return pack_padded_sequence(x, torch.tensor([4, 6, 2]), batch_first=True, enforce_sorted=False)
    return x if batch_first else x.transpose(0, 1).contiguous()


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind, layers, bidirectional, batch_first, bias, proj, packed", CONFIGS)
def test_step_by_step_route_gives_the_fused_outputs(kind, layers, bidirectional, batch_first, bias, proj, packed, dtype):
    """Outputs and final states as the fused call's, to rounding (oneDNN's float32 LSTM rounds
    its sums otherwise; float64 goes through ATen's recipe, which the route follows)."""
    model = _layer(kind, layers, bidirectional, batch_first, bias, proj, dtype)
    x = _inputs(batch_first, packed, dtype)
    want = model(x)
    with _Unfuse():
        got = model(x)
    assert _max_diff(got, want) <= (1e-15 if dtype is torch.float64 else 1e-6)


@pytest.mark.parametrize("cell, extra", [(nn.LSTMCell, {}), (nn.GRUCell, {}), (nn.RNNCell, {}),
                                         (nn.RNNCell, {"nonlinearity": "relu"})])
@pytest.mark.parametrize("bias", [True, False])
def test_cells_step_by_step_equal_the_fused_cell_bit_for_bit(cell, extra, bias):
    model = cell(5, 4, bias=bias, **extra)
    x = torch.randn(3, 5)
    want = model(x)
    with _Unfuse():
        got = model(x)
    assert _max_diff(got, want) == 0.0


def test_dropout_between_layers_draws_the_fused_calls_random_numbers():
    model = nn.LSTM(5, 4, num_layers=3, dropout=0.5).train()
    x = torch.randn(6, 3, 5)
    torch.manual_seed(3)
    want = model(x)
    after_fused = torch.rand(4)
    torch.manual_seed(3)
    with _Unfuse():
        got = model(x)
    assert _max_diff(got, want) <= 1e-6
    assert torch.equal(torch.rand(4), after_fused)


@pytest.mark.parametrize("layer, per_layer", [
    (nn.LSTM(4, 6, batch_first=True), {"sigmoid": 3, "tanh": 2}), (nn.GRU(4, 6, batch_first=True), {"sigmoid": 2, "tanh": 1}),
    (nn.RNN(4, 6, batch_first=True), {"tanh": 1}), (nn.RNN(4, 6, nonlinearity="relu", batch_first=True), {"relu": 1}),
])
def test_inspect_lists_each_gate_as_averaged(layer, per_layer):
    """One site per gate over all rows (a row per sequence and step, time-major) of a padded or a
    packed sequence."""
    model = nn.Sequential()
    model.add_module("rec", layer)
    report = ttadapt.inspect(model, torch.randn(2, 3, 4))  # 3 time steps
    assert not report.unaveraged
    counts = {}
    for c in report.averaged:
        assert c.module == "rec" and c.shape == (3 * 2, 6)
        counts[c.call] = counts.get(c.call, 0) + 1
    assert counts == per_layer
    assert "all averaged" in str(report)
    packed = pack_padded_sequence(torch.randn(2, 3, 4), torch.tensor([3, 2]), batch_first=True)
    report = ttadapt.inspect(model, packed)
    assert not report.unaveraged
    assert [c.shape for c in report.averaged] == [(5, 6)] * sum(per_layer.values())


def test_inspect_with_linear_lists_the_projections_as_affine_sites():
    model = nn.Sequential()
    model.add_module("rec", nn.GRU(4, 6))
    report = ttadapt.inspect(model, torch.randn(3, 2, 4), linear=True)
    # the input projection of all steps, then h W_hhᵀ of all steps (rows = steps × batch), then the gates
    assert [(c.call, c.shape) for c in report.averaged] == [
        ("linear", (6, 4)), ("linear", (6, 6)), ("sigmoid", (6, 6)), ("sigmoid", (6, 6)), ("tanh", (6, 6))]


def test_inspect_marks_a_layer_run_under_no_grad_grad_off_with_its_projections():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.rec = nn.GRU(4, 6)

        def forward(self, x):
            with torch.no_grad():
                first = self.rec(x)[0]
            return self.rec(x)[0] + first

    report = ttadapt.inspect(Twice(), torch.randn(3, 2, 4), linear=True)
    assert [(c.call, c.grad_off) for c in report.calls] == [
        (call, off) for off in (True, False) for call in ("linear", "linear", "sigmoid", "sigmoid", "tanh")]
    assert "ordinary derivative at the graph state" not in str(report)  # (only grad-off calls are NO)


class _Twin(nn.Module):
    """A textbook loop of ``kind`` with ``layer``'s parameters (same names), batch-first padded
    input, zero initial state: every gate an ordinary call of a registered activation."""

    def __init__(self, layer: nn.Module, kind: str) -> None:
        super().__init__()
        self.kind, self.layers, self.directions = kind, layer.num_layers, 2 if layer.bidirectional else 1
        self.hidden, self.relu = layer.hidden_size, getattr(layer, "nonlinearity", "tanh") == "relu"
        for name, p in layer.named_parameters():
            self.register_parameter(name, nn.Parameter(p.detach().clone()))

    def _p(self, name: str, layer: int, direction: int):
        return getattr(self, f"{name}_l{layer}{'_reverse' if direction else ''}", None)

    def forward(self, x):
        x = x.transpose(0, 1)  # time first
        for layer in range(self.layers):
            outs = []
            for d in range(self.directions):
                w_ih, w_hh = self._p("weight_ih", layer, d), self._p("weight_hh", layer, d)
                b_ih, b_hh = self._p("bias_ih", layer, d), self._p("bias_hh", layer, d)
                h = x.new_zeros(x.shape[1], self.hidden)
                c = torch.zeros_like(h)
                steps = list(range(x.shape[0]))[::-1 if d else 1]
                seq = [None] * x.shape[0]
                for t in steps:
                    a, b = F.linear(x[t], w_ih, b_ih), F.linear(h, w_hh, b_hh)
                    if self.kind == "LSTM":
                        ai, af, ag, ao = (a + b).chunk(4, 1)
                        c = torch.sigmoid(af) * c + torch.sigmoid(ai) * torch.tanh(ag)
                        h = torch.sigmoid(ao) * torch.tanh(c)
                    elif self.kind == "GRU":
                        (xr, xz, xn), (hr, hz, hn) = a.chunk(3, 1), b.chunk(3, 1)
                        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                        n = torch.tanh(xn + r * hn)
                        h = (1 - z) * n + z * h
                    else:
                        h = torch.relu(a + b) if self.relu else torch.tanh(a + b)
                    seq[t] = h
                outs.append(torch.stack(seq))
            x = torch.cat(outs, -1)
        return x.transpose(0, 1)


def _regression(model: nn.Module, x: torch.Tensor, target: torch.Tensor):
    def closure():
        out = model(x)
        return ((out[0] if isinstance(out, tuple) else out) - target).pow(2).mean()

    return closure


@pytest.mark.parametrize("kind, layers, bidirectional", [
    ("LSTM", 1, False), ("GRU", 1, False), ("RNN", 1, False), ("LSTM", 2, True), ("GRU", 2, True), ("RNN", 2, True),
    ("RNN-relu", 1, False),
])
@pytest.mark.parametrize("seed", ["current", "other"])
@pytest.mark.parametrize("linear", [False, True])
def test_averaged_gradient_equals_the_loop_written_twins(kind, layers, bidirectional, seed, linear):
    """Same weights, same `other`: nn.LSTM/GRU/RNN's averaged gradient is the one the engine gives
    the textbook loop (float64)."""
    base = kind.split("-")[0]
    extra = {"nonlinearity": "relu"} if kind == "RNN-relu" else {}
    layer = KINDS[base](5, 4, num_layers=layers, bidirectional=bidirectional, batch_first=True, **extra).double()
    twin = _Twin(layer, base).double()
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    target = torch.randn(3, 6, 4 * (2 if bidirectional else 1), dtype=torch.float64)
    other = {n: p.detach() + 0.3 * torch.randn_like(p) for n, p in layer.named_parameters()}
    got = ttadapt.averaged_grad(layer, _regression(layer, x, target), other, seed=seed, linear=linear)
    want = ttadapt.averaged_grad(twin, _regression(twin, x, target), other, seed=seed, linear=linear)
    assert set(got) == set(want)
    ordinary = torch.autograd.grad(_regression(layer, x, target)(), list(layer.parameters()))
    for (name, g), o in zip(got.items(), ordinary):
        torch.testing.assert_close(g, want[name], rtol=1e-10, atol=1e-12)
    assert max((got[n] - o).abs().max().item() for n, o in zip(got, ordinary)) > 1e-3  # (averaging did something)


@pytest.mark.parametrize("cell_cls, kind", [(nn.LSTMCell, "LSTM"), (nn.GRUCell, "GRU"), (nn.RNNCell, "RNN")])
def test_a_cell_driven_loop_averages_as_the_layer_does(cell_cls, kind):
    """nn.LSTMCell & co. called per step by the model: the averaged gradient of the layer with the
    same weights."""
    cell = cell_cls(5, 4).double()
    layer = KINDS[kind](5, 4, batch_first=True).double()
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(layer, f"{name}_l0").copy_(getattr(cell, name))

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = cell

        def forward(self, x):
            h = None
            outs = []
            for t in range(x.shape[1]):
                h = self.cell(x[:, t], h)
                outs.append(h[0] if isinstance(h, tuple) else h)
            return torch.stack(outs, 1)

    loop = Loop()
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    target = torch.randn(3, 6, 4, dtype=torch.float64)
    shift = {n: 0.3 * torch.randn_like(p) for n, p in cell.named_parameters()}
    got = ttadapt.averaged_grad(loop, _regression(loop, x, target), {f"cell.{n}": p.detach() + shift[n] for n, p in cell.named_parameters()})
    want = ttadapt.averaged_grad(layer, _regression(layer, x, target),
                                 {f"{n}_l0": p.detach() + shift[n] for n, p in cell.named_parameters()})
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        torch.testing.assert_close(got[f"cell.{name}"], want[f"{name}_l0"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind, layers, bidirectional, batch_first, bias, proj, packed",
                         [c for c in CONFIGS if c[2] and c[6]] + [("LSTM", 2, False, True, True, 3, False)])
def test_same_state_gives_the_ordinary_gradient(kind, layers, bidirectional, batch_first, bias, proj, packed):
    """`other` = the current parameters: every secant is the derivative (packed, bidirectional,
    projections, no biases, float64)."""
    model = _layer(kind, layers, bidirectional, batch_first, bias, proj, torch.float64)
    x = _inputs(batch_first, packed, torch.float64)

    def closure():
        out, hidden = model(x)
        data = out.data if packed else out
        return data.pow(2).sum() + (hidden[0] if kind == "LSTM" else hidden).sin().sum()

    got = ttadapt.averaged_grad(model, closure, None)
    want = torch.autograd.grad(closure(), list(model.parameters()))
    for g, w in zip(got.values(), want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


def test_dropout_in_training_same_state_gives_the_ordinary_gradient():
    """The passes draw the dropout masks a plain forward from the same random state draws."""
    model = nn.GRU(5, 4, num_layers=3, dropout=0.4).double().train()
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    closure = lambda: model(x)[0].pow(2).sum()  # noqa: E731
    torch.manual_seed(11)
    got = ttadapt.averaged_grad(model, closure, None)
    torch.manual_seed(11)
    want = torch.autograd.grad(closure(), list(model.parameters()))
    for g, w in zip(got.values(), want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("nonlinearity", ["tanh"])
def test_one_step_from_zero_state_is_the_exact_path_average(nonlinearity):
    """One step from h₀ = 0 under a loss linear in the output: h₁ = tanh(W_ih x + b_ih + b_hh), a
    pre-activation affine in the parameters, so the secant slope is the exact mean of the
    derivative along the segment — the quadrature oracle must agree to rounding."""
    model = nn.RNN(5, 4, nonlinearity=nonlinearity).double()
    x = torch.randn(1, 7, 5, dtype=torch.float64)
    v = torch.randn(1, 7, 4, dtype=torch.float64)
    closure = lambda: (model(x)[0] * v).sum()  # noqa: E731
    other = {n: p.detach() + 0.8 * torch.randn_like(p) for n, p in model.named_parameters()}
    got = ttadapt.averaged_grad(model, closure, other)
    want = ttadapt.path_average_grad(model, closure, other, None, points=40)
    ordinary = torch.autograd.grad(closure(), list(model.parameters()))
    for (name, g), o in zip(got.items(), ordinary):
        torch.testing.assert_close(g, want[name], rtol=1e-9, atol=1e-11)
    assert max((g - o).abs().max().item() for g, o in zip(got.values(), ordinary)) > 1e-2


class _Classifier(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.rec = KINDS[kind](5, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        out = self.rec(x)
        return self.head((out[0] if isinstance(out, tuple) else out)[:, -1])

    def twin(self) -> "_Classifier":
        """The same classifier with the loop-written twin of its recurrent layer."""
        twin = _Classifier.__new__(_Classifier)
        nn.Module.__init__(twin)
        twin.rec, twin.head = _Twin(self.rec, type(self.rec).__name__), nn.Linear(8, 3)
        twin.head.load_state_dict(self.head.state_dict())
        return twin.to(self.head.weight.dtype)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("method", ["AG1", "AG2", "AG3"])
def test_wrapper_steps_on_a_recurrent_model_equal_the_twins(kind, method):
    """A wrapper's steps on nn.LSTM/GRU/RNN land where the same steps on the loop-written twin do."""
    torch.manual_seed(0)
    model = _Classifier(kind).double()
    twin = model.twin()
    x = torch.randn(16, 6, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    results = []
    for m in (model, twin):
        opt = torch.optim.Adam(m.parameters(), lr=0.05)
        wrapper = getattr(ttadapt, method)(m, opt, **({"d": 1} if method == "AG3" else {}))
        losses = [float(wrapper.step(lambda: F.cross_entropy(m(x), y))) for _ in range(3)]
        results.append((losses, [p.detach().clone() for p in m.parameters()]))
    (losses, params), (twin_losses, twin_params) = results
    assert losses == pytest.approx(twin_losses, rel=1e-10)
    for a, b in zip(params, twin_params):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_under_autocast_the_fused_call_runs_with_a_warning(fresh_ttadapt_warnings):
    """Autocast casts a fused call and its parts differently: the fused call keeps its gates'
    ordinary derivative, said once, and `inspect` lists it as not averaged."""

    class Casting(nn.Module):
        def __init__(self):
            super().__init__()
            self.rec = nn.GRU(3, 4)

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.rec(x)[0].float().pow(2).sum()

    model = Casting()
    x = torch.randn(5, 2, 3)
    report = ttadapt.inspect(model, x)
    assert [c.call for c in report.unaveraged] == ["gru (fused gates)", "pow"]
    with pytest.warns(RuntimeWarning, match=r"torch\.gru ran as one fused call"):
        got = ttadapt.averaged_grad(model, lambda: model(x), {n: p.detach() + 0.5 for n, p in model.named_parameters()})
    want = torch.autograd.grad(model(x), list(model.parameters()))
    for g, w in zip(got.values(), want):
        assert torch.equal(g, w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ttadapt.averaged_grad(model, lambda: model(x), {})


def _step_by_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send every layer-direction through the step-by-step route instead of the batched one (the
    oracle of the tests below); with the Linear variant, each step's projection its own site."""

    def per_step(kind, x, hidden, w, has_biases, act, reverse, deferred=False, packed=None, pair=None):
        assert pair is None
        p = recurrent._Weights(w, has_biases)
        sizes = None if packed is None else packed.sizes
        return recurrent._direction(kind, F.linear(x, p.w_ih, p.b_ih), hidden, p, act, F.linear, reverse, sizes)

    monkeypatch.setattr(recurrent, "whole_sequence", per_step)
    monkeypatch.setattr(sites.SiteSession, "_affine_pair", None)  # (no batched projection sites: step by step)


class _Fed(nn.Module):
    """A recurrent layer fed by Linear + tanh, so that its input requires a gradient too."""

    def __init__(self, rec: nn.Module) -> None:
        super().__init__()
        self.feed, self.rec = nn.Linear(5, 5).to(next(rec.parameters()).dtype), rec

    def forward(self, x):
        if isinstance(x, torch.nn.utils.rnn.PackedSequence):
            return self.rec(x._replace(data=torch.tanh(self.feed(x.data))))
        return self.rec(torch.tanh(self.feed(x)))


def _route_case(kind, layers, bidirectional, batch_first, bias, proj, packed, monkeypatch):
    """(the layer-directions sent to the batched route, a recurrent layer fed by Linear + tanh in
    float64, another state of its parameters, a closure of its outputs and final states)."""
    calls: list[str] = []
    real = recurrent.whole_sequence
    monkeypatch.setattr(recurrent, "whole_sequence", lambda *a: calls.append(a[0]) or real(*a))
    net = _Fed(_layer(kind, layers, bidirectional, batch_first, bias, proj, torch.float64))
    raw = _inputs(batch_first, packed, torch.float64)
    other = {n: p.detach() + 0.3 * torch.randn_like(p) for n, p in net.named_parameters()}

    def closure():
        out, hidden = net(raw)
        data = out.data if packed else out
        return data.pow(2).sum() + (hidden[1] if kind == "LSTM" else hidden).sin().sum() + data.sum() * hidden[0].sum()

    return calls, net, other, closure


@pytest.mark.parametrize("kind, layers, bidirectional, batch_first, bias, proj, packed", CONFIGS)
@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize("seed", ["current", "other"])
def test_gates_batched_over_time_give_the_step_by_step_routes_gradient(kind, layers, bidirectional, batch_first, bias,
                                                                      proj, packed, linear, seed, monkeypatch):
    """Padded and packed sequences take the batched route (values from the fused call,
    backpropagation through time by hand; an LSTM's projection too; with the Linear variant the
    projections of all steps as one affine site each); its averaged gradient is the step-by-step
    route's (float64), for the input too."""
    calls, net, other, closure = _route_case(kind, layers, bidirectional, batch_first, bias, proj, packed, monkeypatch)
    got = ttadapt.averaged_grad(net, closure, other, seed=seed, linear=linear)
    assert len(calls) == 2 * layers * (2 if bidirectional else 1)  # both passes
    _step_by_step(monkeypatch)
    want = ttadapt.averaged_grad(net, closure, other, seed=seed, linear=linear)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12)
    if linear:  # (and the Linear variant changed something)
        plain = ttadapt.averaged_grad(net, closure, other, seed=seed)
        assert max((got[n] - plain[n]).abs().max().item() for n in got) > 1e-6


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("method", ["AG1", "AG2", "AG3", "AG1-linear", "AG2-linear", "AG3-linear"])
@pytest.mark.parametrize("packed", [False, True])
def test_batched_route_wrapper_steps_equal_the_step_by_step_routes(kind, method, packed, monkeypatch):
    """Two layers, bidirectional, dropout between them in training, padded or packed: AG-1 / AG-2
    (deferred sites, the graph pass's backward run twice) and AG-3, and the Linear variants of
    AG-1, AG-2 (its rescaling call by call) and AG-3, land where they land step by step."""

    def run() -> list[torch.Tensor]:
        torch.manual_seed(4)
        rec = KINDS[kind](5, 6, num_layers=2, bidirectional=True, dropout=0.3, batch_first=True).double().train()
        head = nn.Linear(12, 3).double()
        x = torch.randn(8, 7, 5, dtype=torch.float64)
        if packed:
            x = pack_padded_sequence(x, torch.tensor([7, 3, 5, 7, 1, 2, 6, 4]), batch_first=True, enforce_sorted=False)
        y = torch.randint(0, 3, (8,))
        opt = torch.optim.Adam(list(rec.parameters()) + list(head.parameters()), lr=0.05)

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.rec, self.head = rec, head

            def forward(self, x):
                _, hidden = self.rec(x)
                h = hidden[0] if kind == "LSTM" else hidden
                return self.head(torch.cat([h[-2], h[-1]], 1))

        net = Net()
        name, _, variant = method.partition("-")
        kwargs = {"d": 1} if name == "AG3" else {}
        wrapper = getattr(ttadapt, name)(net, opt, linear=variant == "linear", **kwargs)
        for _ in range(3):
            wrapper.step(lambda: F.cross_entropy(net(x), y))
        return [p.detach().clone() for p in net.parameters()]

    batched = run()
    _step_by_step(monkeypatch)
    stepwise = run()
    for a, b in zip(batched, stepwise):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind, layers, bidirectional, batch_first, bias, proj, packed", CONFIGS)
@pytest.mark.parametrize("seed", ["current", "other"])
def test_ag2_linear_rescaling_in_the_batched_route_is_the_step_by_step_routes(kind, layers, bidirectional, batch_first,
                                                                             bias, proj, packed, seed, monkeypatch):
    """AG-2 Linear rescales each affine call's input and parameter gradients to the ordinary
    ones' norms: the input projection as one call, the hidden (and an LSTM's output) projection
    one call per step. The batched route notes the norms per step in the ordinary backward and
    rescales to them in the averaged one: the step-by-step route's gradient (float64), whose
    calls are separate sites. (A packed sequence's backward direction goes step by step in both.)"""
    from ttadapt.averaged import DeferredAverage

    calls, net, other, closure = _route_case(kind, layers, bidirectional, batch_first, bias, proj, packed, monkeypatch)

    def grads(rescale: bool) -> dict[str, torch.Tensor]:
        run = DeferredAverage(net, closure, linear=True, rescale=rescale)
        run.ordinary_grad()
        return run.averaged_grad(other, seed=seed)

    got = grads(True)
    directions = 2 if bidirectional and not packed else 1
    assert len(calls) == 2 * layers * directions  # both passes
    unscaled = grads(False)
    assert max((got[n] - unscaled[n]).abs().max().item() for n in got) > 1e-6  # (the rescaling did something)
    _step_by_step(monkeypatch)
    want = grads(True)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", list(KINDS))
def test_float32_same_state_is_the_ordinary_gradient(kind):
    """float32 (the fused LSTM on oneDNN, the secant kernels): at the same state the averaged
    gradient is the ordinary one to float32 rounding."""
    model = KINDS[kind](16, 32, num_layers=2, batch_first=True)
    x = torch.randn(8, 12, 16)
    closure = lambda: model(x)[0].pow(2).mean()  # noqa: E731
    got = ttadapt.averaged_grad(model, closure, None)
    want = torch.autograd.grad(closure(), list(model.parameters()))
    for g, w in zip(got.values(), want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("seed", ["current", "other"])
def test_initial_state_from_another_layer_gets_its_gradient(kind, seed, monkeypatch):
    """An encoder-decoder: the decoder starts from the encoder's final state, so the gradient
    flows through h0 (and c0) — the batched route's as the step-by-step route's (float64)."""

    class Seq2Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = KINDS[kind](5, 6, num_layers=2, batch_first=True)
            self.decoder = KINDS[kind](3, 6, num_layers=2, batch_first=True)
            self.head = nn.Linear(6, 2)

        def forward(self, source, target):
            _, state = self.encoder(source)
            out, _ = self.decoder(target, state)
            return self.head(out)

    torch.manual_seed(6)
    model = Seq2Seq().double()
    source, target = torch.randn(4, 7, 5, dtype=torch.float64), torch.randn(4, 3, 3, dtype=torch.float64)
    other = {n: p.detach() + 0.3 * torch.randn_like(p) for n, p in model.named_parameters()}
    closure = lambda: model(source, target).pow(2).sum()  # noqa: E731
    got = ttadapt.averaged_grad(model, closure, other, seed=seed)
    assert any(g.abs().max() > 0 for n, g in got.items() if n.startswith("encoder"))
    _step_by_step(monkeypatch)
    want = ttadapt.averaged_grad(model, closure, other, seed=seed)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12)


def test_an_input_modified_in_place_after_the_layer_is_refused_as_autograd_refuses_it():
    """The batched route keeps the layer's input for the weight gradient as the fused call does:
    modified in place before the backward, the averaged backward refuses it as the ordinary one."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.feed, self.rec = nn.Linear(5, 5), nn.GRU(5, 4)

        def forward(self, x):
            h = self.feed(x)
            out, _ = self.rec(h)
            h.mul_(2.0)  # after the layer used it
            return out.pow(2).sum()

    model = Net()
    x = torch.randn(6, 3, 5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        model(x).backward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        ttadapt.averaged_grad(model, lambda: model(x), {n: p.detach() + 0.1 for n, p in model.named_parameters()})
