"""Optimizer wrappers (spec §3) against independent references: plain autograd, the engine's
own oracle-tested ``averaged_grad``, and the base optimizer's real ``step()`` on twin copies."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ttadapt
from ttadapt.optim import AnchorStore, OptimizerSnapshot, anchor_index, dry_run


# -- fixtures ---------------------------------------------------------------------------------
def mlp(act: nn.Module | None = None, bn: bool = False) -> nn.Module:
    layers = [nn.Linear(6, 8)]
    if bn:
        layers.append(nn.BatchNorm1d(8))
    layers += [act if act is not None else nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers)


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3), nn.ELU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    )


MODELS = {"tanh_mlp": lambda: mlp(), "relu_bn_cnn": cnn, "gelu_mlp": lambda: mlp(nn.GELU())}


def batches(name: str, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (10, 1, 8, 8) if name == "relu_bn_cnn" else (10, 6)
    return [(torch.randn(shape, generator=g), torch.randint(0, 3, (10,), generator=g)) for _ in range(n)]


def closure_for(model, x, y):
    return lambda: F.cross_entropy(model(x), y)


OPTIMIZERS = {
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam_foreach": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True),
    "adam_fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True),
    "soap": lambda p: ttadapt.SOAP(p, lr=1e-2, precondition_frequency=2),
}


def state_equal(a, b) -> bool:
    """Structural, bitwise equality of two state trees."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b))
    return a == b


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def twins(make_model, make_opt):
    torch.manual_seed(3)
    m1 = make_model()
    m2 = copy.deepcopy(m1)
    return m1, make_opt(m1.parameters()), m2, make_opt(m2.parameters())


# -- dry run ----------------------------------------------------------------------------------
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_dry_run_restores_everything_bit_for_bit(opt_name):
    m1, o1, m2, o2 = twins(lambda: mlp(bn=True), OPTIMIZERS[opt_name])
    data = batches("tanh_mlp", 6)
    for x, y in data:
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
        before_state = copy.deepcopy(o1.state_dict())
        before_params = params_of(m1)
        before_grads = {n: p.grad.clone() for n, p in m1.named_parameters()}
        new1 = dry_run(o1)
        new2 = dry_run(o1, {p: torch.randn_like(p) for p in m1.parameters()})  # a second one, other grads
        assert state_equal(o1.state_dict(), before_state)
        assert all(torch.equal(p, before_params[n]) for n, p in m1.named_parameters())
        assert all(torch.equal(p.grad, before_grads[n]) for n, p in m1.named_parameters())
        o1.step()
        o2.step()
        # the dry run predicted the real step, and the twin that never dry-ran agrees bitwise
        assert all(torch.equal(new1[p1], p1) for p1 in m1.parameters())
        assert any(not torch.equal(new2[p1], p1) for p1 in m1.parameters()) or opt_name == "soap"
        assert all(torch.equal(p1, p2) for p1, p2 in zip(m1.parameters(), m2.parameters()))


def test_dry_run_never_steps_a_scheduler_and_handles_wrapped_optimizers():
    from pytorch_optimizer import Lookahead

    torch.manual_seed(0)
    m = mlp()
    opt = Lookahead(torch.optim.Adam(m.parameters(), lr=1e-2), k=2)
    sched = torch.optim.lr_scheduler.StepLR(opt.optimizer, step_size=1, gamma=0.5)
    x, y = batches("tanh_mlp", 1)[0]
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        snap_inner = copy.deepcopy(opt.optimizer.state_dict())
        snap_outer = {p: copy.deepcopy(s) for p, s in opt.state.items()}
        lr, epoch = opt.optimizer.param_groups[0]["lr"], sched.last_epoch
        dry_run(opt)
        assert state_equal(opt.optimizer.state_dict(), snap_inner)
        assert all(state_equal(opt.state[p], s) for p, s in snap_outer.items())
        assert opt.optimizer.param_groups[0]["lr"] == lr and sched.last_epoch == epoch
        opt.step()
        sched.step()


def test_snapshot_deletes_state_created_by_the_dry_run():
    m = mlp()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    snap = OptimizerSnapshot(opt)
    opt.step()
    assert len(opt.state) > 0
    snap.restore()
    assert len(opt.state) == 0


# -- AG-1 / AG-2 ------------------------------------------------------------------------------
def _reference_forward_looking(model, opt, closure, full_vector: bool, linear: bool):
    """AG-1 / AG-2 composed from independently tested parts: autograd's gradient, the base
    optimizer's real step (dry runs on the state), and ttadapt.averaged_grad."""
    params = dict(model.named_parameters())
    theta = params_of(model)
    opt.zero_grad()
    loss = closure()
    loss.backward()
    before = OptimizerSnapshot(opt)
    forecast = {n: v for n, v in zip(params, dry_run(opt).values())}
    avg = ttadapt.averaged_grad(model, closure, forecast, seed="other", linear=linear)
    if full_vector:
        second = dry_run(opt, {params[n]: avg[n] for n in params})
        second = {n: v for n, v in zip(params, second.values())}
        l1f = sum((forecast[n] - theta[n]).double().abs().sum() for n in params)
        l1s = sum((second[n] - theta[n]).double().abs().sum() for n in params)
        scale = float(l1f / l1s) if l1s > 0 else 0.0  # SOAP's first step moves nothing
        expected = {n: theta[n] + (second[n] - theta[n]) * scale for n in params}
    else:
        expected = {n: theta[n] - (forecast[n] - theta[n]).abs() * avg[n].sign() for n in params}
    opt.step()  # the committed state advances with the ordinary gradient
    del before
    return expected, forecast, avg


@pytest.mark.parametrize("model_name,linear", [("tanh_mlp", False), ("tanh_mlp", True), ("relu_bn_cnn", False),
                                               ("relu_bn_cnn", True), ("gelu_mlp", False)])
@pytest.mark.parametrize("opt_name", ["rmsprop", "adam", "soap"])
@pytest.mark.parametrize("method", ["AG1", "AG2"])
def test_forward_looking_step_matches_its_definition(model_name, opt_name, method, linear):
    torch.manual_seed(1)
    m1 = MODELS[model_name]().double()
    m2 = copy.deepcopy(m1)
    o1, o2 = OPTIMIZERS[opt_name](m1.parameters()), OPTIMIZERS[opt_name](m2.parameters())
    wrapper = getattr(ttadapt, method)(m1, o1, linear=linear)
    full = method == "AG2"
    for x, y in batches(model_name, 3):
        x = x.double()
        expected, forecast, avg = _reference_forward_looking(m2, o2, closure_for(m2, x, y), full, linear and not full)
        if full and linear:
            # AG-2 Linear rescales per layer; the unscaled reference does not apply: check length only
            with torch.no_grad():
                for n, p in m2.named_parameters():
                    p.copy_(expected[n])
            theta = params_of(m1)
            wrapper.step(closure_for(m1, x, y))
            step = sum((p.detach() - theta[n]).abs().sum() for n, p in m1.named_parameters())
            fl = sum((forecast[n] - theta[n]).abs().sum() for n in theta)
            assert abs(float(step) - float(fl)) <= 1e-6 * max(1.0, float(fl))
            with torch.no_grad():
                for n, p in m2.named_parameters():
                    p.copy_(dict(m1.named_parameters())[n])
            continue
        theta = params_of(m1)
        wrapper.step(closure_for(m1, x, y))
        got = params_of(m1)
        for n in got:
            assert torch.allclose(got[n], expected[n], rtol=1e-9, atol=1e-12), n
        if not full:  # per coordinate: the forecast's magnitude wherever the sign is not zero
            for n in got:
                moved = avg[n] != 0
                assert torch.allclose((got[n] - theta[n]).abs()[moved], (forecast[n] - theta[n]).abs()[moved], rtol=1e-9, atol=1e-14)
        else:
            l1_step = sum((got[n] - theta[n]).abs().sum() for n in got)
            l1_fore = sum((forecast[n] - theta[n]).abs().sum() for n in got)
            assert abs(float(l1_step - l1_fore)) <= 1e-6 * max(1.0, float(l1_fore))
        # the committed optimizer state is the one advanced by the ordinary gradient
        assert state_equal(o1.state_dict(), o2.state_dict()) or opt_name == "soap"
        with torch.no_grad():
            for (n, p2), p1 in zip(m2.named_parameters(), m1.parameters()):
                p2.copy_(p1)


def test_ag2_linear_rescales_each_affine_layer_to_the_ordinary_norms():
    from ttadapt.averaged import DeferredAverage

    torch.manual_seed(0)
    m = mlp().double()
    x, y = batches("tanh_mlp", 1)[0]
    x = x.double()
    cl = closure_for(m, x, y)
    other = {n: p.detach() + 0.5 * torch.randn_like(p) for n, p in m.named_parameters()}
    run = DeferredAverage(m, cl, linear=True, rescale=True)
    ordinary = run.ordinary_grad()
    averaged = run.averaged_grad(other)
    plain = ttadapt.averaged_grad(m, cl, other, seed="other", linear=True)
    for layer in ("0", "2", "4"):
        names = [f"{layer}.weight", f"{layer}.bias"]
        n_ord = torch.sqrt(sum(ordinary[n].square().sum() for n in names))
        n_avg = torch.sqrt(sum(averaged[n].square().sum() for n in names))
        n_plain = torch.sqrt(sum(plain[n].square().sum() for n in names))
        assert torch.allclose(n_avg, n_ord, rtol=1e-10)
        assert not torch.allclose(n_plain, n_ord, rtol=1e-3)  # the rescaling does something
        cos = sum((averaged[n] * plain[n]).sum() for n in names) / (n_avg * n_plain)
        if layer == "4":  # the last layer's parameter gradient is only rescaled, not redirected
            assert cos > 1 - 1e-10


@pytest.mark.parametrize("act", [nn.Tanh(), nn.ReLU(inplace=True), nn.GELU(), nn.PReLU(), nn.ELU(), nn.Softplus(),
                                 nn.ELU(inplace=True), nn.Hardtanh(inplace=True), nn.Sigmoid(), nn.Mish(), nn.Softsign(),
                                 nn.Tanhshrink()],
                         ids=lambda a: type(a).__name__ + ("_" if getattr(a, "inplace", False) else ""))
@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize("seed", ["other", "current"])
def test_deferred_average_equals_two_pass_engine(act, linear, seed):
    """One graph differentiated twice gives the ordinary gradient, then exactly the averaged one
    (native activations keep PyTorch's own autograd node, hooked for the second backward;
    composite ones — Softsign, Tanhshrink — and PReLU run as ttadapt's autograd functions)."""
    from ttadapt.averaged import DeferredAverage

    torch.manual_seed(0)
    m = mlp(act, bn=True).double()
    x, y = batches("tanh_mlp", 1)[0]
    x = x.double()
    cl = closure_for(m, x, y)
    other = {n: p.detach() + 0.3 * torch.randn_like(p) for n, p in m.named_parameters()}
    buffers = {n: b.clone() for n, b in m.named_buffers()}
    run = DeferredAverage(m, cl, linear=linear)
    ordinary = run.ordinary_grad()
    after_graph = {n: b.clone() for n, b in m.named_buffers()}
    averaged = run.averaged_grad(other, seed=seed)
    assert all(torch.equal(b, after_graph[n]) for n, b in m.named_buffers())  # the pass at `other`: no BN update
    for n, b in m.named_buffers():
        b.copy_(buffers[n])
    m.zero_grad()
    cl().backward()
    for n, p in m.named_parameters():
        if linear or isinstance(act, (nn.PReLU, nn.Softsign, nn.Tanhshrink)):
            assert torch.allclose(ordinary[n], p.grad, rtol=1e-12, atol=1e-14)
        else:  # ATen's own activation backward (vjp): plain autograd's gradient bit for bit
            assert torch.equal(ordinary[n], p.grad), n
    for n, b in m.named_buffers():
        b.copy_(buffers[n])
    ref = ttadapt.averaged_grad(m, cl, other, seed=seed, linear=linear)
    for n in ref:
        assert torch.allclose(averaged[n], ref[n], rtol=1e-12, atol=1e-14), n


@pytest.mark.parametrize("big", [False, True], ids=["native-node", "autograd-function"])
@pytest.mark.parametrize("act", [nn.ELU(), nn.SELU(), nn.CELU(alpha=0.7), nn.ReLU(), nn.ReLU(inplace=True), nn.Tanh()],
                         ids=lambda a: type(a).__name__ + ("_" if getattr(a, "inplace", False) else ""))
def test_deferred_average_float32_fused_backward(act, big, monkeypatch):
    """float32, where the fused kernels form g ⊙ secant in the averaged backward (ties
    included: `other` equals θ in the first layer's bias): the two-pass engine's result, to
    float32 rounding — through the hooked native node (sites up to PRODUCT_MAX elements, and
    in-place calls) and through the autograd function (larger sites, here every site), whose
    ordinary backward is PyTorch's own."""
    from ttadapt import secant
    from ttadapt.averaged import DeferredAverage

    if big:
        monkeypatch.setattr(secant, "PRODUCT_MAX", 0)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 300), act, nn.Linear(300, 300), act, nn.Linear(300, 3))
    x = torch.randn(64, 6)
    cl = lambda: m(x).square().sum()  # noqa: E731
    other = {n: p.detach() + 0.05 * torch.randn_like(p) for n, p in m.named_parameters()}
    other["0.weight"] = m[0].weight.detach().clone()
    other["0.bias"] = m[0].bias.detach().clone()  # the first site's inputs tie exactly
    run = DeferredAverage(m, cl)
    function = big and not getattr(act, "inplace", False)
    assert [slot.native is None for slot in run.session.slots] == [function, function]
    m.zero_grad()
    m(x).square().sum().backward()
    for n, g in run.ordinary_grad().items():
        assert torch.equal(g, m.get_parameter(n).grad), n  # the native backward either way
    got = run.averaged_grad(other, seed="current")
    want = ttadapt.averaged_grad(m, cl, other)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=2e-5, atol=1e-5)


def test_deferred_average_towards_the_parameters_as_they_are_now():
    """``averaged_grad(None)``: the other state is the model's parameters when it is called (the
    caller stepped them in place after the graph pass), as if they had been passed."""
    from ttadapt.averaged import DeferredAverage

    torch.manual_seed(0)
    m = mlp().double()
    x, y = next(iter(batches("tanh_mlp", 1)))
    cl = closure_for(m, x.double(), y)
    start = {n: p.detach().clone() for n, p in m.named_parameters()}
    runs = [DeferredAverage(m, cl), DeferredAverage(m, cl)]
    for run in runs:
        run.ordinary_grad()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    moved = {n: p.detach().clone() for n, p in m.named_parameters()}
    implicit = runs[0].averaged_grad(None, seed="other")
    explicit = runs[1].averaged_grad(moved, seed="other")
    for n in explicit:
        assert torch.equal(implicit[n], explicit[n]), n
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(start[n])
    want = ttadapt.averaged_grad(m, cl, moved, seed="other")
    for n in want:
        assert torch.allclose(implicit[n], want[n], rtol=1e-12, atol=1e-14), n


def test_native_sites_are_hooked_and_let_go():
    """Native calls keep PyTorch's node (no ttadapt autograd function in the graph); composite
    ones do not qualify; the hook lets go of the kept tensors once the averaged backward used
    them (the graph, alive until the loss dies, must not hold them)."""
    from ttadapt.averaged import DeferredAverage
    from ttadapt.deferred import single_node_call

    u = torch.randn(3, 4, requires_grad=True) * 1
    assert single_node_call(torch.tanh, (u,), {}, u, False)
    assert single_node_call(F.elu, (u,), {"alpha": 0.5}, u, False)
    assert single_node_call(torch.relu_, (u,), {}, u, True)
    assert not single_node_call(F.softsign, (u,), {}, u, False)
    assert not single_node_call(F.tanhshrink, (u,), {}, u, False)

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Softsign(), nn.Linear(8, 2))
    x = torch.randn(5, 4)
    run = DeferredAverage(m, lambda: m(x).square().sum())
    names = [type(n).__name__ for n in _graph_nodes(run._loss.grad_fn)]
    assert "TanhBackward0" in names and "DeferredActivationBackward" in names
    slots = list(run.session.slots)
    assert [s.native is not None for s in slots] == [True, False]
    run.ordinary_grad()
    run.averaged_grad({n: p.detach() + 0.1 for n, p in m.named_parameters()})
    native = slots[0]
    assert native.ub is None and native.native.ua is None  # let go of, though the graph lives on
    assert run._loss.grad_fn is not None


def _graph_nodes(root):
    seen, todo = [], [root]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.append(node)
        todo.extend(f for f, _ in node.next_functions)
    return seen


# -- AG-3 -------------------------------------------------------------------------------------
def test_anchor_index_formula():
    assert [anchor_index(t, 3) for t in range(12)] == [max(0, (t // 3) * 3 - 3) for t in range(12)]
    assert [anchor_index(t, 3) for t in range(12)] == [0, 0, 0, 0, 0, 0, 3, 3, 3, 6, 6, 6]
    assert [anchor_index(t, 1) for t in range(5)] == [0, 0, 1, 2, 3]


@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("storage", ["device", "cpu", "disk"])
@pytest.mark.parametrize("linear", [False, True])
def test_ag3_uses_the_scheduled_anchor(d, storage, linear, tmp_path):
    torch.manual_seed(0)
    m = mlp().double()
    opt = torch.optim.RMSprop(m.parameters(), lr=1e-2)
    wrapper = ttadapt.AG3(m, opt, d=d, linear=linear, anchor_storage=storage,
                          anchor_dir=tmp_path / "anchors" if storage == "disk" else None)
    history = []
    anchors_used = []
    for t, (x, y) in enumerate(batches("tanh_mlp", 12)):
        x = x.double()
        history.append(params_of(m))
        a = max(0, (t // d) * d - d)
        cl = closure_for(m, x, y)
        expected = ttadapt.averaged_grad(m, cl, history[a], seed="current", linear=linear)
        wrapper.step(cl)
        anchors_used.append(wrapper.last_anchor)
        for n, p in m.named_parameters():
            assert torch.allclose(p.grad, expected[n], rtol=1e-12, atol=1e-14), (t, n)
        assert len(wrapper.anchors.indices()) <= (1 if d == 1 else 2)
        if storage == "disk":
            assert wrapper.anchors.directory.parent == tmp_path / "anchors"
            files = sorted(p.name for p in wrapper.anchors.directory.iterdir())
            assert len(files) == len(wrapper.anchors.indices()) and all(f.endswith(".pt") for f in files)
    assert anchors_used == [max(0, (t // d) * d - d) for t in range(12)]
    if d == 1:
        assert anchors_used[1:] == list(range(11))
    wrapper.close()
    if storage == "disk":
        assert list((tmp_path / "anchors").iterdir()) == []


@pytest.mark.parametrize("how", ["add_param_group", "requires_grad"])
def test_ag3_takes_on_parameters_after_its_anchor(how):
    # progressive unfreezing: the last layer joins training at step 2, after the anchor of
    # steps 0..5 (d = 3) was taken without it; until the next snapshot its anchor value is its
    # value then, which it still has (it was not trained) — the oracle is the averaged gradient
    # towards the model's whole state at the anchor step
    torch.manual_seed(0)
    m = mlp().double()
    head = list(m[4].parameters())
    if how == "add_param_group":
        opt = torch.optim.Adam([p for p in m.parameters() if all(p is not q for q in head)], lr=1e-2)
    else:
        for p in head:
            p.requires_grad_(False)
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    wrapper = ttadapt.AG3(m, opt, d=3)
    history = []
    for t, (x, y) in enumerate(batches("tanh_mlp", 8)):
        x = x.double()
        if t == 2:
            if how == "add_param_group":
                opt.add_param_group({"params": head})
            else:
                for p in head:
                    p.requires_grad_(True)
        history.append(params_of(m))
        cl = closure_for(m, x, y)
        expected = ttadapt.averaged_grad(m, cl, history[anchor_index(t, 3)], seed="current")
        wrapper.step(cl)
        trained = {id(p) for group in opt.param_groups for p in group["params"] if p.requires_grad}
        for n, p in m.named_parameters():
            if id(p) in trained:
                assert torch.allclose(p.grad, expected[n], rtol=1e-12, atol=1e-14), (t, n)
    assert all(not torch.equal(p, history[2]["4." + k]) for k, p in m[4].named_parameters())  # (it trained)


@pytest.mark.parametrize("opt_name", ["rmsprop", "adam", "soap"])
def test_ag3_step_zero_is_the_base_optimizer(opt_name):
    m1, o1, m2, o2 = twins(lambda: mlp(bn=True), OPTIMIZERS[opt_name])
    x, y = batches("tanh_mlp", 1)[0]
    ttadapt.AG3(m1, o1, d=4).step(closure_for(m1, x, y))
    o2.zero_grad()
    F.cross_entropy(m2(x), y).backward()
    o2.step()
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(m1.buffers(), m2.buffers()))


def test_anchor_stores_sharing_a_directory_keep_their_own_snapshots(tmp_path):
    # two runs given one anchor_dir (a sweep sharing a recipe, the ranks of a distributed run)
    a, b = AnchorStore("disk", tmp_path / "shared"), AnchorStore("disk", tmp_path / "shared")
    assert a.directory != b.directory and a.directory.parent == b.directory.parent == tmp_path / "shared"
    a.put(3, {"w": torch.ones(2)})
    b.put(3, {"w": torch.full((2,), 7.0)})
    b.drop_before(4)
    assert torch.equal(a.get(3)["w"], torch.ones(2)) and 3 not in b
    a.close()
    b.close()
    assert list((tmp_path / "shared").iterdir()) == []


def test_anchor_store_refuses_an_unusable_directory(tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="cannot keep anchor snapshots in"):
        AnchorStore("disk", blocker / "anchors")


def test_anchor_store_disk_writes_atomically_and_cleans_up(tmp_path):
    store = AnchorStore("disk")
    directory = store.directory
    store.put(0, {"w": torch.ones(3)})
    store.put(5, {"w": torch.zeros(3)})
    assert torch.equal(store.get(0)["w"], torch.ones(3))
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]
    store.drop_before(5)
    assert store.indices() == [5] and len(list(directory.iterdir())) == 1
    store.close()
    assert not directory.exists()
    with pytest.raises(ValueError, match="anchor_storage"):
        AnchorStore("gpu")


# -- SAM --------------------------------------------------------------------------------------
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_steps_with_the_gradient_at_the_perturbed_point(adaptive):
    torch.manual_seed(0)
    m = mlp(bn=True).double()
    x, y = batches("tanh_mlp", 1)[0]
    x = x.double()
    ref = copy.deepcopy(m)
    theta = params_of(m)
    rho = 0.1
    # reference: gradient at θ, then at θ + e on a copy (buffers of the copy are thrown away)
    ref.zero_grad()
    F.cross_entropy(ref(x), y).backward()
    buffers_after_one_pass = {n: b.clone() for n, b in ref.named_buffers()}
    g = {n: p.grad.clone() for n, p in ref.named_parameters()}
    t = {n: theta[n].abs() if adaptive else torch.ones_like(theta[n]) for n in theta}
    norm = torch.sqrt(sum((t[n] * g[n]).square().sum() for n in g))
    probe = copy.deepcopy(ref)
    with torch.no_grad():
        for n, p in probe.named_parameters():
            p.add_(rho * t[n] ** 2 * g[n] / norm)
    probe.zero_grad()
    F.cross_entropy(probe(x), y).backward()
    opt = torch.optim.SGD(m.parameters(), lr=0.0)  # lr 0: the step must leave θ exactly
    ttadapt.SAM(m, opt, rho=rho, adaptive=adaptive).step(closure_for(m, x, y))
    assert all(torch.equal(p, theta[n]) for n, p in m.named_parameters())  # perturbation undone exactly
    for (n, p), q in zip(m.named_parameters(), probe.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-10, atol=1e-12)
    assert all(torch.equal(b, buffers_after_one_pass[n]) for n, b in m.named_buffers())  # BN once


# -- checkpoints ------------------------------------------------------------------------------
WRAPPERS = {
    "AG1": lambda m, o, tmp: ttadapt.AG1(m, o),
    "AG1_linear": lambda m, o, tmp: ttadapt.AG1(m, o, linear=True),
    "AG2": lambda m, o, tmp: ttadapt.AG2(m, o),
    "AG2_linear": lambda m, o, tmp: ttadapt.AG2(m, o, linear=True),
    "AG3_device": lambda m, o, tmp: ttadapt.AG3(m, o, d=2),
    "AG3_cpu": lambda m, o, tmp: ttadapt.AG3(m, o, d=2, anchor_storage="cpu"),
    "AG3_disk": lambda m, o, tmp: ttadapt.AG3(m, o, d=2, anchor_storage="disk", anchor_dir=tmp),
    "AG3_1": lambda m, o, tmp: ttadapt.AG3(m, o, d=1),
    "SAM": lambda m, o, tmp: ttadapt.SAM(m, o, rho=0.05),
}


@pytest.mark.parametrize("steps_before", [0, 3])
@pytest.mark.parametrize("wrapper_name", list(WRAPPERS))
def test_a_closure_calling_backward_is_explained(wrapper_name, steps_before, tmp_path):
    # torch.optim.LBFGS's closures call zero_grad() and backward(); the wrappers' may not
    torch.manual_seed(0)
    m = cnn()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    wrapper = WRAPPERS[wrapper_name](m, opt, tmp_path / "a")
    x, y = batches("relu_bn_cnn", 1)[0]
    for _ in range(steps_before):  # (AG-3's first step runs the closure once, later ones twice)
        wrapper.step(closure_for(m, x, y))
    before = params_of(m)

    def lbfgs_style():
        opt.zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="does the closure call loss.backward"):
        wrapper.step(lbfgs_style)
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())


@pytest.mark.parametrize("wrapper_name", list(WRAPPERS))
@pytest.mark.parametrize("opt_name", ["rmsprop", "adam", "soap"])
def test_resume_equals_uninterrupted(wrapper_name, opt_name, tmp_path):
    data = batches("relu_bn_cnn", 7)

    def fresh(seed=5):
        torch.manual_seed(seed)
        m = cnn()
        return m, WRAPPERS[wrapper_name](m, OPTIMIZERS[opt_name](m.parameters()), tmp_path / "a")

    m_ref, w_ref = fresh()
    for x, y in data:
        w_ref.step(closure_for(m_ref, x, y))

    m1, w1 = fresh()
    for x, y in data[:4]:
        w1.step(closure_for(m1, x, y))
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": w1.state_dict()}, buf)
    buf.seek(0)
    if hasattr(w1, "close"):
        w1.close()
    del m1, w1
    ckpt = torch.load(buf, weights_only=True)
    m2, w2 = fresh(seed=99)  # different init: everything must come from the checkpoint
    m2.load_state_dict(ckpt["model"])
    w2.load_state_dict(ckpt["opt"])
    for x, y in data[4:]:
        w2.step(closure_for(m2, x, y))
    for (n, a), b in zip(m_ref.named_parameters(), m2.parameters()):
        assert torch.equal(a, b), n
    assert all(torch.equal(a, b) for a, b in zip(m_ref.buffers(), m2.buffers()))


def test_load_state_dict_rejects_a_different_method():
    m = mlp()
    sd = ttadapt.AG1(m, torch.optim.SGD(m.parameters(), lr=0.1)).state_dict()
    with pytest.raises(ValueError, match="AG1"):
        ttadapt.SAM(m, torch.optim.SGD(m.parameters(), lr=0.1)).load_state_dict(sd)
    sd3 = ttadapt.AG3(m, torch.optim.SGD(m.parameters(), lr=0.1), d=3).state_dict()
    with pytest.raises(ValueError, match="d=3"):
        ttadapt.AG3(m, torch.optim.SGD(m.parameters(), lr=0.1), d=4).load_state_dict(sd3)


# -- non-finite guard -------------------------------------------------------------------------
@pytest.mark.parametrize("wrapper_name", ["AG1", "AG2_linear", "AG3_device", "AG3_1", "SAM"])
@pytest.mark.parametrize("opt_name", ["adam", "soap"])
def test_nan_batch_skips_the_update_and_leaves_everything(wrapper_name, opt_name, tmp_path):
    torch.manual_seed(0)
    m = cnn()
    opt = OPTIMIZERS[opt_name](m.parameters())
    w = WRAPPERS[wrapper_name](m, opt, tmp_path)
    data = batches("relu_bn_cnn", 3)
    for x, y in data[:2]:
        w.step(closure_for(m, x, y))
    params, buffers = params_of(m), {n: b.clone() for n, b in m.named_buffers()}
    state = copy.deepcopy(w.state_dict())
    x, y = data[2]
    x = x.clone()
    x[3, 0, 2, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped"):
        loss = w.step(closure_for(m, x, y))
    assert not torch.isfinite(loss)
    assert w.skipped_steps == 1
    assert all(torch.equal(p, params[n]) for n, p in m.named_parameters())
    assert all(torch.equal(b, buffers[n]) for n, b in m.named_buffers())
    after = w.state_dict()
    assert state_equal(after["optimizer"], state["optimizer"]) and after["step"] == state["step"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w.step(closure_for(m, *data[0]))  # and it goes on normally


@pytest.mark.parametrize("method", ["AG1", "AG2"])
@pytest.mark.parametrize("opt_name", ["sgd", "adam", "rmsprop"])
@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize("kernels_on", [True, False])
def test_nan_in_the_averaged_gradient_only_restores_the_forecast(method, opt_name, warm, kernels_on, monkeypatch):
    """A forecast state where the loss is not finite: the ordinary gradient is fine, the
    averaged one is not; the wrapper must undo the forecast step and its optimizer state. (With
    the fused kernels, the AG-1 update and AG-2's closed-form dry step for Adam and RMSprop
    detect it on their way; without them, or for AG-2 with SGD, G′ is checked first.)"""
    if not kernels_on:
        from ttadapt import kernels

        monkeypatch.setitem(kernels._state, "lib", None)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    x = torch.randn(5, 3)
    make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=1.0, momentum=0.9), "adam": lambda ps: torch.optim.Adam(ps, lr=0.1),
            "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.1, centered=True)}[opt_name]
    opt = make(m.parameters())
    if warm:  # a state to restore, not only an empty one
        for _ in range(2):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    saved = copy.deepcopy(opt.state_dict())
    w = getattr(ttadapt, method)(m, opt)
    params = params_of(m)

    def closure():
        out = m(x)
        # finite at θ, infinite once any weight moved (the forecast)
        bad = (m[0].weight - params["0.weight"]).abs().sum() > 0
        return out.square().mean() * (float("inf") if bool(bad) else 1.0)

    with pytest.warns(RuntimeWarning, match="averaged gradient"):
        w.step(closure)
    assert all(torch.equal(p, params[n]) for n, p in m.named_parameters())
    assert state_equal(opt.state_dict(), saved)


# -- errors -----------------------------------------------------------------------------------
def test_bad_arguments_raise_clear_errors():
    m = mlp()
    other = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        ttadapt.AG1(m, torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        ttadapt.AG2(m, object())
    with pytest.raises(TypeError, match="nn.Module"):
        ttadapt.SAM("model", torch.optim.SGD(m.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="d must be"):
        ttadapt.AG3(m, torch.optim.SGD(m.parameters(), lr=0.1), d=0)
    with pytest.raises(ValueError, match="anchor_storage"):
        ttadapt.AG3(m, torch.optim.SGD(m.parameters(), lr=0.1), anchor_storage="ssd")
    with pytest.raises(ValueError, match="rho"):
        ttadapt.SAM(m, torch.optim.SGD(m.parameters(), lr=0.1), rho=-1)
    w = ttadapt.AG1(m, torch.optim.SGD(m.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="closure"):
        w.step(None)
    with pytest.raises(ValueError, match="unknown optimizer"):
        ttadapt.create_optimizer("adagradd", m.parameters(), lr=0.1)
    for wrapper in (ttadapt.AG1, ttadapt.AG2, ttadapt.AG3, ttadapt.SAM):  # (its step() would fail mid-step)
        with pytest.raises(ValueError, match=r"LBFGS.step\(\) needs a closure"):
            wrapper(m, torch.optim.LBFGS(m.parameters()))


def test_soap_constructor_takes_reference_names_and_paper_defaults():
    m = mlp()
    opt = ttadapt.SOAP(m.parameters(), max_precond_dim=64, normalize_grads=True)
    g = opt.param_groups[0]
    assert g["betas"] == (0.95, 0.95) and g["precondition_frequency"] == 10
    assert g["max_precondition_dim"] == 64 and g["normalize_gradient"] is True and g["merge_dims"] is False
    made = ttadapt.create_optimizer("soap", m.parameters(), lr=1e-3)
    assert made.param_groups[0]["precondition_frequency"] == 10
    rms = ttadapt.create_optimizer("rmsprop", m.parameters(), lr=1e-3)
    assert rms.param_groups[0]["alpha"] == 0.99


@pytest.mark.parametrize("wrapper_name", ["AG1", "AG2", "AG2_linear"])
@pytest.mark.parametrize("opt_name", ["adam", "adam_foreach", "soap"])
def test_recycled_buffers_change_nothing(wrapper_name, opt_name):
    """AG-1/AG-2 recycle last step's optimizer-state snapshots and copies of θ; a trajectory
    equals, bit for bit, one where every step starts from a fresh wrapper (nothing to recycle)."""
    data = batches("relu_bn_cnn", 6)
    torch.manual_seed(5)
    m_ref = cnn()
    m_fresh = copy.deepcopy(m_ref)
    opt_ref = OPTIMIZERS[opt_name](m_ref.parameters())
    w_ref = WRAPPERS[wrapper_name](m_ref, opt_ref, None)
    opt_fresh = OPTIMIZERS[opt_name](m_fresh.parameters())
    state = None
    pointers = []
    for x, y in data:
        w_ref.step(closure_for(m_ref, x, y))
        pointers.append(sorted(t.data_ptr() for t in w_ref._spare_start.values()))
        w = WRAPPERS[wrapper_name](m_fresh, opt_fresh, None)
        if state is not None:
            w.load_state_dict(state)
        w.step(closure_for(m_fresh, x, y))
        state = copy.deepcopy(w.state_dict())
    assert pointers[1] == pointers[-1]  # the copies of θ were written into the same memory
    for (n, a), b in zip(m_ref.named_parameters(), m_fresh.parameters()):
        assert torch.equal(a, b), n
    assert state_equal(opt_ref.state_dict(), opt_fresh.state_dict())


@pytest.mark.parametrize("wrapper_name", ["AG1", "AG2", "AG2_linear"])
def test_recorded_step_lengths(wrapper_name):
    """record_lengths: the forecast's (L1, L2) and the committed step's, against the parameters
    the test itself saw before and after the step."""
    torch.manual_seed(0)
    m = mlp()
    opt = torch.optim.RMSprop(m.parameters(), lr=1e-2)
    w = WRAPPERS[wrapper_name](m, opt, None)
    w.record_lengths = True
    for x, y in batches("tanh_mlp", 3):
        before = [p.detach().clone() for p in m.parameters()]
        w.step(closure_for(m, x, y))
        f1, f2, s1, s2 = w.last_lengths
        delta = [p.detach() - b for p, b in zip(m.parameters(), before)]
        assert s1 == pytest.approx(sum(float(d.double().abs().sum()) for d in delta), rel=1e-5)
        assert s2 == pytest.approx(sum(float(d.double().square().sum()) for d in delta) ** 0.5, rel=1e-5)
        assert f1 == pytest.approx(w.last_forecast_l1, rel=1e-6)
        if wrapper_name.startswith("AG2"):
            assert s1 == pytest.approx(f1, rel=1e-5)  # AG-2 keeps the forecast's L1 length
        else:
            assert s1 <= f1 * (1 + 1e-6) and s2 <= f2 * (1 + 1e-6)  # AG-1: per-coordinate magnitudes


@pytest.mark.parametrize("wrapper_name", ["AG1", "AG2"])
def test_recorded_loss_after_the_step(wrapper_name):
    """record_loss_after: the loss at the updated parameters with the step's own dropout masks;
    the global RNG and BatchNorm buffers end as without it."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3))
    twin = copy.deepcopy(m)
    w = WRAPPERS[wrapper_name](m, torch.optim.RMSprop(m.parameters(), lr=1e-2), None)
    w_twin = WRAPPERS[wrapper_name](twin, torch.optim.RMSprop(twin.parameters(), lr=1e-2), None)
    w.record_loss_after = True
    for x, y in batches("tanh_mlp", 2):
        start = torch.get_rng_state()
        w.step(closure_for(m, x, y))
        rng_after = torch.get_rng_state()
        torch.set_rng_state(start)
        w_twin.step(closure_for(twin, x, y))
        assert torch.equal(torch.get_rng_state(), rng_after)
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), twin.state_dict().values()))
        torch.set_rng_state(start)
        with torch.no_grad():
            buffers = {k: v.clone() for k, v in m.named_buffers()}
            expected = F.cross_entropy(m(x), y)
            m.load_state_dict({**m.state_dict(), **buffers})
        torch.set_rng_state(rng_after)
        assert torch.equal(w.last_loss_after, expected)


class _OwnAdam(torch.optim.Adam):
    """Torch's Adam under a class of this module: not known to look its state up on every step,
    so AG-2 runs its dry step with copies of the state instead of swapping state objects."""


def _own_soap(params):
    from pytorch_optimizer import SOAP

    own = type("_OwnSOAP", (SOAP,), {"__module__": __name__})
    return own(params, lr=1e-2, precondition_frequency=2, merge_dims=False)


def _lookahead(params, own: bool):
    from pytorch_optimizer import Lookahead

    cls = type("_OwnLookahead", (Lookahead,), {"__module__": __name__}) if own else Lookahead
    return cls(torch.optim.Adam(params, lr=1e-2), k=2, alpha=0.5)


@pytest.mark.parametrize("opt_name", ["adam", "adam_fused", "soap", "lookahead"])
def test_ag2_swapping_state_equals_copying_it(opt_name, monkeypatch):
    """AG-2's dry step from the state before the forecast: swapping the snapshot's state objects
    in (torch.optim / pytorch-optimizer) gives, bit for bit, the trajectory and optimizer state
    of restoring it by copies (an optimizer class ttadapt does not know). Both run the real
    dry step (Adam's and SOAP's closed forms, tests/test_closed_form.py and
    tests/test_soap_step.py, are switched off)."""
    import ttadapt.optim.forward_looking as forward_looking
    from ttadapt.optim.snapshot import swappable

    monkeypatch.setattr(forward_looking, "dry_direction", lambda *args: None)
    monkeypatch.setattr(forward_looking, "soap_dry_step", lambda *args: None)
    monkeypatch.setattr(forward_looking, "fused_forecast", lambda *args: None)

    data = batches("relu_bn_cnn", 6)
    torch.manual_seed(7)
    m_swap = cnn()
    m_copy = copy.deepcopy(m_swap)
    o_swap = _lookahead(m_swap.parameters(), own=False) if opt_name == "lookahead" else OPTIMIZERS[opt_name](m_swap.parameters())
    if opt_name == "lookahead":  # a wrapper optimizer with its own state around Adam's
        o_copy = _lookahead(m_copy.parameters(), own=True)
    elif opt_name == "soap":
        o_copy = _own_soap(m_copy.parameters())
    else:
        o_copy = _OwnAdam(m_copy.parameters(), lr=1e-2, **({"fused": True} if opt_name == "adam_fused" else {}))
    assert swappable(o_swap) and not swappable(o_copy)
    w_swap, w_copy = ttadapt.AG2(m_swap, o_swap), ttadapt.AG2(m_copy, o_copy)
    for x, y in data:
        w_swap.step(closure_for(m_swap, x, y))
        w_copy.step(closure_for(m_copy, x, y))
    for (n, a), b in zip(m_swap.named_parameters(), m_copy.parameters()):
        assert torch.equal(a, b), n
    assert state_equal(o_swap.state_dict(), o_copy.state_dict())


def test_swapped_state_detects_an_optimizer_that_keeps_references():
    from ttadapt.optim.snapshot import OptimizerSnapshot

    class KeepsBuffers(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 0.1})
            self.bufs = []

        @torch.no_grad()
        def step(self):
            if not self.bufs:
                for p in self.param_groups[0]["params"]:
                    self.state[p]["buf"] = torch.zeros_like(p)
                    self.bufs.append(self.state[p]["buf"])
            for p, b in zip(self.param_groups[0]["params"], self.bufs):
                b.add_(p.grad)  # writes through its own references, not state[p]
                p.sub_(b, alpha=0.1)

    p = nn.Parameter(torch.ones(3))
    opt = KeepsBuffers([p])
    p.grad = torch.ones(3)
    opt.step()
    swapped = OptimizerSnapshot(opt).swap_in()
    opt.step()
    with pytest.raises(RuntimeError, match="keeps references to its state tensors"):
        swapped.put_back()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.complex64])
def test_all_finite_against_isfinite(dtype):
    """The non-finite guard's check against ``torch.isfinite(...).all()``, including finite
    values whose sum overflows (must still count as finite)."""
    from ttadapt.optim.base import all_finite

    big = torch.finfo(torch.float32 if dtype == torch.complex64 else dtype).max / 2
    cases = [
        [torch.randn(100).to(dtype), torch.randn(3, 4).to(dtype)],
        [torch.full((10,), big).to(dtype)],  # sum overflows, every element finite
        [torch.randn(50).to(dtype), torch.tensor([1.0, float("nan")]).to(dtype)],
        [torch.tensor([float("inf"), 1.0]).to(dtype)],
        [torch.tensor([float("-inf"), float("inf")]).to(dtype)],
        [torch.tensor(2.0).to(dtype), None, torch.zeros(0, dtype=dtype)],
        # above 2**14 elements a tensor is summed on its own, below that normed with the rest
        [torch.randn(20000).to(dtype), torch.randn(7).to(dtype)],
        [torch.randn(20000).to(dtype), torch.tensor([1.0, float("nan")]).to(dtype)],
        [torch.cat([torch.randn(20000), torch.tensor([float("inf")])]).to(dtype), torch.randn(7).to(dtype)],
        [torch.full((20000,), big).to(dtype), torch.randn(7, dtype=torch.float64)],
    ]
    for tensors in cases:
        want = all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)
        assert all_finite(*tensors) is want


class _SparseEmbedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.e = nn.Embedding(50, 8, sparse=True)
        self.l = nn.Linear(8, 2)

    def forward(self, i):
        return self.l(torch.tanh(self.e(i)).mean(1))


@pytest.mark.parametrize("method", ["AG1", "AG2", "AG3", "SAM"])
def test_sparse_embedding_gradients_with_sparse_adam(method):
    """``nn.Embedding(sparse=True)`` gives sparse gradients (ordinary and averaged); AG-1's update
    used to fail on them. AG-1's step: the forecast's magnitude, G′'s sign, per coordinate."""
    m = _SparseEmbedder()
    i, y = torch.randint(0, 50, (4, 6)), torch.randint(0, 2, (4,))
    opt = torch.optim.SparseAdam(list(m.e.parameters()), lr=0.01)
    wrapper = getattr(ttadapt, method)(m, opt, **({"d": 1} if method == "AG3" else {}))

    def closure():
        return F.cross_entropy(m(i), y)

    for _ in range(2):
        if method == "AG1":
            theta = m.e.weight.detach().clone()
            m.e.weight.grad = torch.autograd.grad(closure(), [m.e.weight])[0]
            forecast = ttadapt.optim.dry_run(opt)[m.e.weight]
            m.e.weight.grad = None
            averaged = ttadapt.averaged_grad(m, closure, {"e.weight": forecast}, seed="other")["e.weight"]
            want = theta - (forecast - theta).abs() * averaged.to_dense().sign()
        wrapper.step(closure)
        assert wrapper.skipped_steps == 0 and torch.isfinite(m.e.weight).all()
        if method == "AG1":
            assert torch.allclose(m.e.weight.detach(), want, rtol=0, atol=1e-7)


@pytest.mark.parametrize("method", ["AG1", "AG2", "AG3", "SAM"])
def test_a_step_under_no_grad_takes_its_gradients(method):
    """As LBFGS runs its closure: AG-3's first (plain) step and SAM's steps used to change
    nothing under no_grad. Under inference_mode a step is refused before it changes anything."""
    results = []
    for context in ("enable_grad", "no_grad"):
        torch.manual_seed(0)
        m = mlp()
        start = [p.detach().clone() for p in m.parameters()]
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        wrapper = getattr(ttadapt, method)(m, torch.optim.SGD(m.parameters(), lr=0.1), **({"d": 1} if method == "AG3" else {}))
        for _ in range(3):
            with getattr(torch, context)():
                wrapper.step(lambda: F.cross_entropy(m(x), y))
        results.append([p.detach().clone() for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert not all(torch.equal(a, b) for a, b in zip(results[1], start))
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(RuntimeError, match="inference_mode"), torch.inference_mode():
        wrapper.step(lambda: F.cross_entropy(m(x), y))
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), before))
