"""``ttadapt finetune``: typed config, exact resume, atomic checkpoints, DDP on gloo, bad input."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from ttadapt import models as zoo
from ttadapt.atomic import torch_save_atomically
from ttadapt.cli import app
from ttadapt.config import ConfigError, parse_overrides
from ttadapt.finetune import (EpochSampler, FinetuneConfig, finetune, load_finetune_config, read_checkpoint)
from ttadapt.optim import AG3

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


class _DropoutBN(nn.Module):
    """A small mnist-input model with BatchNorm (buffers) and Dropout (the global RNG)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.BatchNorm2d(4), nn.GELU(), nn.Flatten(),
                                  nn.Dropout(0.3), nn.Linear(4 * 13 * 13, 16), nn.Tanh())
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.fixture(scope="module", autouse=True)
def _test_model():
    zoo.register_model(zoo.ModelInfo("test_dropout_bn", lambda c: _DropoutBN(c), 10, "mnist", None, ("head.",), "test model"))
    yield
    zoo._REGISTRY.pop("test_dropout_bn", None)


def _config(tmp_path: Path, name: str, **over) -> FinetuneConfig:
    items = [f"out={tmp_path / name}", "model.name=test_dropout_bn", "model.weights=null", "data.name=mnist5k",
             "data.batch_size=16", "data.train_limit=96", "data.val_limit=64", "data.num_workers=0", "optim.name=adam",
             "optim.lr=0.003", "method.name=ag3", "method.d=2", "epochs=2", "checkpoint_every=4", "log_every=100"]
    items += [f"{k}={v}" for k, v in over.items()]
    return load_finetune_config(None, items)


def _params(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


class _Stop(Exception):
    pass


# -- config -------------------------------------------------------------------------------------
def test_config_from_yaml_with_dotted_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\noptim: {name: adam, lr: 0.01}\nmethod: {name: sam}\ndata: {name: mnist5k}\nmodel: {name: model_b}\n")
    config = load_finetune_config(recipe, ["optim.lr=2e-3", "--epochs", "3", "--method.rho=0.1", "data.options={a: 1}"])
    assert config.optim.lr == 2e-3 and config.optim.name == "adam"
    assert config.epochs == 3 and config.method.name == "sam" and config.method.rho == 0.1
    assert config.data.options == {"a": 1}
    assert parse_overrides(["--data.batch-size", "8"]) == [("data.batch_size", 8)]


@pytest.mark.parametrize("overrides, message", [
    (["optim.learning_rate=1"], "unknown config key(s) optim.learning_rate; valid keys of optim: name, lr, max_grad_norm, options"),
    (["bogus=1"], "valid keys: name, model, data, optim, method, schedule, epochs"),
    (["method.name=adamw"], "method.name: 'adamw' is not one of 'plain', 'ag1', 'ag2', 'ag3', 'ag3_1', 'sam'"),
    (["epochs=two"], "epochs: expected an integer, got 'two'"),
    (["optim.name=lion"], "optim.name: unknown optimizer 'lion'"),
    (["model.name=resnet9000"], "model.name: unknown model 'resnet9000'"),
    (["epochs=0"], "epochs must be >= 1, got 0"),
    (["model.name=model_c"], "model.name and data.name: model_c takes token ids and mnist5k gives 1×28×28 grey images"),
    (["model.name=resnet152"], "resnet152 takes 3-channel images and mnist5k gives 1×28×28 grey images; datasets for resnet152: imagefolder"),
    (["optim.lr=0"], "optim.lr must be > 0, got 0.0"),
    (["method.d=0"], "method.d must be >= 1, got 0"),
    (["method.rho=-0.1"], "method.rho must be >= 0, got -0.1"),
    (["max_steps=0"], "max_steps must be >= 1 (or null), got 0"),
    (["epochs=0", "log_every=0"], "epochs must be >= 1, got 0; log_every must be >= 1, got 0"),
    (["lr=1e-3"], "unknown config key(s) lr; did you mean optim.lr? valid keys: name, model"),
    (["optim.name=adam", "optim.options={betas: abc}"], "optim.options {'betas': 'abc'} do not fit adam: "),
    (["optim.name=adam", "optim.options={bogus: 1}"], "do not fit adam: Adam.__init__() got an unexpected keyword argument 'bogus'"),
    (["optim.name=soap", "optim.options={precondition_frequency: often}"], "do not fit soap: "),
    (["batch_size=8"], "unknown config key(s) batch_size; did you mean data.batch_size? valid keys:"),
    (["data.name=imagefolder"], "data.train: imagefolder needs the training folder"),
    (["optim=3"], "optim: expected a mapping of name, lr, max_grad_norm, options"),
])
def test_config_errors_name_the_key_and_what_is_valid(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_finetune_config(None, ["data.name=mnist5k", "model.name=model_b", *overrides])
    assert message in str(err.value)


def test_epoch_sampler_shards_the_single_process_batches():
    single = EpochSampler(50, 8, seed=3)
    single.set_epoch(2)
    ranks = [EpochSampler(50, 4, seed=3, rank=r, world=2) for r in range(2)]
    for s in ranks:
        s.set_epoch(2)
    one = list(single)
    parts = [list(s) for s in ranks]
    assert len(one) == 48 and all(len(p) == 24 for p in parts)
    for b in range(6):
        assert sorted(one[8 * b:8 * b + 8]) == sorted(parts[0][4 * b:4 * b + 4] + parts[1][4 * b:4 * b + 4])
    later = EpochSampler(50, 8, seed=3)
    later.set_epoch(2, start_batch=4)
    assert list(later) == one[32:]
    other_epoch = EpochSampler(50, 8, seed=3)
    other_epoch.set_epoch(3)
    assert list(other_epoch) != one


# -- runs, resume, checkpoints ------------------------------------------------------------------
def test_run_writes_its_outputs_and_learns(tmp_path):
    config = _config(tmp_path, "run", **{"method.name": "plain", "data.train_limit": 512, "epochs": 3, "data.val_limit": 500,
                                         "optim.lr": 0.003, "model.name": "model_a"})
    result = finetune(config)
    out = tmp_path / "run"
    for name in ("config.yaml", "log.txt", "metrics.jsonl", "checkpoint.pt", "model.pt"):
        assert (out / name).is_file(), name
    assert result.steps == 3 * (512 // 16)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.history[-1]["top1"] > 0.3 and result.history[-1]["top5"] >= result.history[-1]["top1"]
    assert load_finetune_config(out / "config.yaml") == config  # the resolved config reloads to the same run
    model = zoo.create("model_a", weights=str(out / "model.pt"))  # the final weights are a zoo checkpoint
    assert torch.equal(model.state_dict()["14.weight"], _params(out / "model.pt")["14.weight"])
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("method, optim", [("plain", "adam"), ("ag3", "adam"), ("ag3_1", "adam"), ("sam", "adam"),
                                           ("ag3", "soap"), ("sam", "rmsprop"), ("plain", "sgd")])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, method, optim):
    over = {"method.name": method, "optim.name": optim}
    whole = finetune(_config(tmp_path, "whole", **over))
    interrupted = _config(tmp_path, "cut", **over)

    def stop(step, loss):
        if step == 9:  # after the checkpoint of step 8 (mid-epoch 2), as if the process died
            raise _Stop

    with pytest.raises(_Stop):
        finetune(interrupted, on_step=stop)
    assert read_checkpoint(tmp_path / "cut" / "checkpoint.pt")["position"] == {"epoch": 1, "batch": 2, "step": 8, "skipped": 0}
    resumed = finetune(interrupted, resume=True)
    assert resumed.steps == whole.steps == 12
    a, b = _params(tmp_path / "whole" / "model.pt"), _params(tmp_path / "cut" / "model.pt")
    for name in a:
        assert torch.equal(a[name], b[name]), name  # parameters and BatchNorm buffers, bit for bit
    assert resumed.history == whole.history
    ca, cb = read_checkpoint(tmp_path / "whole" / "checkpoint.pt"), read_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    if method.startswith("ag3"):
        assert sorted(ca["optimizer"]["anchors"]) == sorted(cb["optimizer"]["anchors"]) != []
    assert torch.equal(ca["rng"][0]["cpu"], cb["rng"][0]["cpu"])


@pytest.mark.parametrize("method", ["plain", "ag3_1", "sam", "ag2"])
def test_max_grad_norm_bounds_every_step(tmp_path, method):
    """SGD without momentum, a bound far below the gradients' norms: after 3 steps the weights
    are within 3 · lr · bound = 3e-5 of where they started (about 0.054 without the bound)."""
    lr, bound = 0.1, 1e-4
    over = {"method.name": method, "optim.name": "sgd", "optim.options.momentum": 0, "optim.lr": lr,
            "optim.max_grad_norm": bound, "max_steps": 3, "schedule.name": "constant", "eval_every": 0,
            "model.name": "model_a"}
    finetune(_config(tmp_path, "clipped", **over))
    torch.manual_seed(0)
    start = zoo.create("model_a", weights=None).state_dict()
    end = _params(tmp_path / "clipped" / "model.pt")
    moved = torch.cat([(end[k] - start[k]).flatten() for k in start if k in end and end[k].is_floating_point()])
    assert 0 < torch.linalg.vector_norm(moved).item() <= 3 * lr * bound * (1 + 1e-4)
    with pytest.raises(ConfigError, match="optim.max_grad_norm"):
        _config(tmp_path, "bad", **{"optim.max_grad_norm": 0})


def test_a_crash_while_writing_leaves_the_last_checkpoint_loadable(tmp_path, monkeypatch):
    config = _config(tmp_path, "crash")
    import ttadapt.atomic as atomic

    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, fh, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint (step 8): half a file, then the process "dies"
            fh.write(b"PK\x03\x04 half a checkpoint")
            raise _Stop
        return real_save(obj, fh, *args, **kwargs)

    monkeypatch.setattr(atomic.torch, "save", dying_save)
    with pytest.raises(_Stop):
        finetune(config)
    monkeypatch.setattr(atomic.torch, "save", real_save)
    ckpt = read_checkpoint(tmp_path / "crash" / "checkpoint.pt")
    assert ckpt["position"]["step"] == 4
    assert not list((tmp_path / "crash").glob(".*.tmp"))  # no temporary file left behind
    resumed = finetune(config, resume=True)
    finetune(_config(tmp_path, "whole"))
    a, b = _params(tmp_path / "whole" / "model.pt"), _params(tmp_path / "crash" / "model.pt")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert resumed.steps == 12


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    torch_save_atomically({"v": torch.ones(3)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        torch_save_atomically({"v": Boom()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_a_fresh_run_never_overwrites_an_existing_checkpoint(tmp_path):
    finetune(_config(tmp_path, "a", epochs=1))
    before = (tmp_path / "a" / "checkpoint.pt").read_bytes()
    with pytest.raises(ConfigError, match="checkpoint.pt exists: continue that run with --resume"):
        finetune(_config(tmp_path, "a", epochs=1))
    assert (tmp_path / "a" / "checkpoint.pt").read_bytes() == before


def test_resume_with_a_different_recipe_is_refused(tmp_path):
    finetune(_config(tmp_path, "a", epochs=1))
    with pytest.raises(ConfigError, match=r"different config: optim.lr \(0.003 → 0.01\)"):
        finetune(_config(tmp_path, "a", **{"optim.lr": 0.01}), resume=True)
    more = finetune(_config(tmp_path, "a", epochs=2), resume=True)  # more epochs may be added
    assert more.steps == 12


def test_imagefolder_with_augmentation_and_workers_resumes_exactly(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    g = torch.Generator().manual_seed(0)
    for c in range(3):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(12):
            pixels = (torch.rand(30, 30, generator=g) * 80 + 60 * c).to(torch.uint8).numpy()
            Image.fromarray(pixels, mode="L").save(root / f"class{c}" / f"{i}.png")
    common = {"data.name": "imagefolder", "data.train": str(root), "data.val": str(root), "data.image_size": 28,
              "data.batch_size": 8, "data.train_limit": "null", "data.val_limit": "null", "data.num_workers": 2,
              "model.num_classes": 3, "epochs": 2, "checkpoint_every": 4, "method.name": "ag3"}
    whole = finetune(_config(tmp_path, "whole", **common))
    assert whole.steps == 8 and whole.history[-1]["top5"] == 1.0  # 3 classes: top-5 is every class

    def stop(step, loss):
        if step == 6:
            raise _Stop

    with pytest.raises(_Stop):
        finetune(_config(tmp_path, "cut", **common), on_step=stop)
    finetune(_config(tmp_path, "cut", **common), resume=True)
    a, b = _params(tmp_path / "whole" / "model.pt"), _params(tmp_path / "cut" / "model.pt")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_labels_beyond_the_head_are_refused(tmp_path):
    with pytest.raises(ValueError, match="the training labels reach 9 but test_dropout_bn predicts 3 classes"):
        finetune(_config(tmp_path, "x", **{"model.num_classes": 3}))


# -- command line -------------------------------------------------------------------------------
def _one_line_error(result, text):
    assert result.exit_code == 2, result.output
    assert text in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_runs_a_recipe_with_overrides(tmp_path):
    out = tmp_path / "cli"
    result = runner.invoke(app, ["finetune", str(REPO / "recipes" / "finetune_tiny.yaml"), f"out={out}", "--max-steps", "6", "-q"])
    assert result.exit_code == 0, result.output
    assert read_checkpoint(out / "checkpoint.pt")["position"]["step"] == 6
    again = runner.invoke(app, ["finetune", str(REPO / "recipes" / "finetune_tiny.yaml"), f"out={out}", "max_steps=8", "--resume"],
                          terminal_width=200)
    assert again.exit_code == 0, again.output
    assert "resuming" in again.output and "from step 6" in again.output
    assert read_checkpoint(out / "checkpoint.pt")["position"]["step"] == 8


def test_cli_missing_data_directory(tmp_path):
    result = runner.invoke(app, ["finetune", str(REPO / "recipes" / "resnet152_imagenet_ood_ag3.yaml"),
                                 f"data.train={tmp_path / 'nowhere'}", "model.weights=null", f"out={tmp_path / 'o'}"])
    _one_line_error(result, "does not exist")
    assert "nowhere" in result.output


def test_cli_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {name: adam, lr: [1e-3\nepochs: 3\n")
    _one_line_error(runner.invoke(app, ["finetune", str(bad)]), "is not valid YAML")


def test_cli_unknown_keys_list_the_valid_ones(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 1\nlearning_rate: 0.1\n")
    result = runner.invoke(app, ["finetune", str(recipe)], terminal_width=400)
    _one_line_error(result, "unknown config key(s) learning_rate; valid keys: name, model, data, optim, method, schedule")


def test_cli_images_the_model_cannot_take(tmp_path):
    from PIL import Image

    for c in range(2):
        (tmp_path / "img" / f"c{c}").mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (20, 20), (60 * c, 0, 0)).save(tmp_path / "img" / f"c{c}" / f"{i}.png")
    result = runner.invoke(app, ["finetune", "model.name=test_dropout_bn", "model.weights=null", "data.name=imagefolder",
                                 f"data.train={tmp_path / 'img'}", "data.image_size=20", "data.batch_size=4", "data.num_workers=0",
                                 "model.num_classes=2", "optim.name=adam", f"out={tmp_path / 'o'}", "-q"], terminal_width=400)
    _one_line_error(result, "fine-tuning stopped:")


def test_cli_missing_recipe_and_bad_resume(tmp_path):
    _one_line_error(runner.invoke(app, ["finetune", str(tmp_path / "none.yaml")]), "does not exist")
    result = runner.invoke(app, ["finetune", str(REPO / "recipes" / "finetune_tiny.yaml"), f"out={tmp_path / 'empty'}", "--resume"])
    _one_line_error(result, "no checkpoint at")


# -- distributed (gloo, two processes on the CPU) -----------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, x: torch.Tensor, y: torch.Tensor, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = zoo.create("model_b").double()  # float64: the comparison checks algebra, not float32 rounding
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    wrapper = AG3(model, opt, d=1)
    share = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    xs, ys = x[share], y[share]
    grads = []
    for _ in range(3):
        wrapper.step(lambda: F.cross_entropy(ddp(xs), ys), anchor_closure=lambda: F.cross_entropy(model(xs), ys))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    if rank == 0:
        torch.save({"grads": grads, "params": model.state_dict()}, out)
    dist.destroy_process_group()


def test_ddp_ag3_gradients_equal_single_process_on_the_concatenated_batch(tmp_path):
    import torch.multiprocessing as mp

    from ttadapt.data import mnist5k

    x, y = mnist5k("train").tensors
    x, y = x[:64].double(), y[:64]
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), x, y, str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)

    torch.manual_seed(0)
    model = zoo.create("model_b").double()
    wrapper = AG3(model, torch.optim.SGD(model.parameters(), lr=0.05), d=1)
    for step in range(3):
        plain = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        wrapper.step(lambda: F.cross_entropy(model(x), y))
        if step > 0:  # the averaged gradient is far from the ordinary one: the comparison can fail
            assert max(float((g - p.grad).abs().max() / p.grad.abs().max()) for g, p in zip(plain, model.parameters())) > 0.1
        for n, p in model.named_parameters():
            ref = p.grad
            if step == 0:
                continue  # AG-3's first step is an ordinary one; steps 1 and 2 are averaged
            err = (got["grads"][step][n] - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
            assert err < 1e-6, (step, n, float(err))
    for n, p in model.state_dict().items():
        torch.testing.assert_close(got["params"][n], p, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["ag3", "ag2", "sam"])
def test_torchrun_two_processes_match_one_process(tmp_path, method):
    """The whole command under torchrun (gloo): rank 0 alone writes, and the run ends where the
    single-process run with the same global batch ends (AG-3 through the DDP reducer, AG-2 and
    SAM with explicit all-reduces)."""
    args = [str(REPO / "recipes" / "finetune_tiny.yaml"), "max_steps=6", "checkpoint_every=3", f"method.name={method}", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "ttadapt", "finetune", *args, f"out={tmp_path / 'one'}"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "ttadapt", "finetune", *args, f"out={tmp_path / 'two'}"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _params(tmp_path / "one" / "model.pt"), _params(tmp_path / "two" / "model.pt")
    # the all-reduce sums the two halves' gradients in another order than one process does; AG-2's
    # dry Adam step, g/√v on coordinates whose averaged gradient is near zero, amplifies that
    # rounding (one weight of 100 off by 9.4e-6, a tenth of a 1e-4 step, seen on one CPU)
    atol = 3e-5 if method == "ag2" else 1e-6
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-5, atol=atol)
    ckpt = read_checkpoint(tmp_path / "two" / "checkpoint.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert (tmp_path / "two" / "log.txt").read_text().count("saved final checkpoint") == 1  # rank 0 only


@pytest.mark.parametrize("method", ["ag3", "sam"])
def test_bfloat16_autocast_path(tmp_path, method):
    """The mixed-precision path GPUs take (amp=auto there), forced on the CPU with amp=bf16."""
    result = finetune(_config(tmp_path, "amp", amp="bf16", **{"method.name": method, "method.d": 1}))
    torch.manual_seed(0)  # the run's seed: the same initial weights
    start = zoo.create("test_dropout_bn")
    assert result.steps == 12 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    final = _params(tmp_path / "amp" / "model.pt")
    assert all(final[n].dtype == torch.float32 for n in final if final[n].is_floating_point())  # weights stay float32
    assert not torch.equal(final["head.weight"], start.state_dict()["head.weight"])


@pytest.mark.parametrize("method", ["ag1", "ag2"])
def test_forward_looking_methods_measure_the_batch_loss_improvement(tmp_path, method):
    result = finetune(_config(tmp_path, method, **{"method.name": method, "method.measure_batch_loss": "true"}))
    ckpt = read_checkpoint(tmp_path / method / "checkpoint.pt")
    ag, plain = ckpt["decreases"]["ag"], ckpt["decreases"]["plain"]
    assert len(ag) == len(plain) == result.steps == 12
    expected = (sum(ag) - sum(plain)) / abs(sum(plain))
    assert result.history[-1]["batch_loss_improvement"] == pytest.approx(expected, rel=1e-9)
    assert "batch-loss improvement over the ordinary update" in (tmp_path / method / "log.txt").read_text()


def test_forward_looking_resume_is_bit_identical(tmp_path):
    over = {"method.name": "ag2", "method.measure_batch_loss": "true"}
    whole = finetune(_config(tmp_path, "whole", **over))

    def stop(step, loss):
        if step == 9:
            raise _Stop

    with pytest.raises(_Stop):
        finetune(_config(tmp_path, "cut", **over), on_step=stop)
    resumed = finetune(_config(tmp_path, "cut", **over), resume=True)
    a, b = _params(tmp_path / "whole" / "model.pt"), _params(tmp_path / "cut" / "model.pt")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert resumed.history == whole.history


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")
                                          if p.name.startswith(("resnet152_", "finetune_"))))
def test_shipped_finetune_recipes_are_valid(recipe):
    config = load_finetune_config(REPO / "recipes" / recipe)
    assert config.name == Path(recipe).stem
    if recipe.startswith("resnet152_"):  # the paper's appendix: ResNet-152, global batch 64, ImageNet weights
        assert config.model.name == "resnet152" and config.data.batch_size == 64 and config.model.weights == "imagenet"
    if recipe in ("resnet152_imagenet_ood_ag3.yaml", "resnet152_imagenet_ood_soap.yaml", "resnet152_imagenet_ood_sam.yaml"):
        assert config.optim.name == "soap" and config.optim.options["betas"] == [0.95, 0.95]
        assert config.optim.options["precondition_frequency"] == 10
    if recipe == "resnet152_imagenet_ood_ag3.yaml":
        assert config.method.name == "ag3" and config.method.d == 300
