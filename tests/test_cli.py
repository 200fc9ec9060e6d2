"""The command line, through Typer's CliRunner."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from ttadapt import __version__
from ttadapt.cli import app

runner = CliRunner()
RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_no_arguments_shows_help():
    result = runner.invoke(app, [])
    assert "activations" in result.output and "inspect" in result.output


def test_activations_lists_the_registry():
    result = runner.invoke(app, ["activations"], terminal_width=200)
    assert result.exit_code == 0
    for name in ("relu", "gelu", "prelu", "hardswish", "tanhshrink"):
        assert name in result.output
    assert "CPU secants: " in result.output  # whether the fused kernels are in use, and why not
    assert "Max pooling in ttadapt's passes: " in result.output
    assert "Freed CPU memory: " in result.output


def test_inspect_a_torchvision_model():
    result = runner.invoke(app, ["inspect", "--model", "resnet18", "--input-size", "3", "32", "32"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "ResNet: 17 pointwise calls, all averaged" in result.output
    assert "layer4.1.relu" in result.output


def test_inspect_unknown_model_is_one_line_and_status_2():
    result = runner.invoke(app, ["inspect", "--model", "resnet_9000"])
    assert result.exit_code == 2
    assert "unknown model 'resnet_9000'" in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_inspect_input_that_does_not_fit():
    result = runner.invoke(app, ["inspect", "--model", "resnet18", "--input-size", "5", "32", "32"])
    assert result.exit_code == 2
    assert "does not run on input (2, 5, 32, 32)" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("width", [200, 80])
def test_models_lists_the_zoo_with_parameter_counts(width):
    result = runner.invoke(app, ["models"], terminal_width=width)
    assert result.exit_code == 0
    for text in ("model_a", "17,502", "8,228", "14,403", "resnet152_sigmoid", "60,192,808",
                 "28 × Linear with Tanh (10 units)"):  # (a narrow terminal: descriptions below the table, whole)
        assert text in result.output
    assert all(len(line) <= width for line in result.output.splitlines() if "│" in line)


def test_inspect_takes_zoo_models():
    result = runner.invoke(app, ["inspect", "--model", "model_b"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "tanh" in result.output and "elu" in result.output


def test_train_writes_a_loadable_checkpoint(tmp_path):
    import torch

    from ttadapt import models

    out = tmp_path / "sub" / "b.pt"
    result = runner.invoke(app, ["train", "--model", "model_b", "--epochs", "1", "--lr", "3e-3", "--out", str(out)],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output
    model = models.create("model_b", weights=out)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    assert (out.stat().st_mode & 0o044) == 0o044  # readable like any file the user writes


def test_train_bad_input_is_one_line_and_exit_2(tmp_path):
    for args, text in (
        (["train", "--model", "model_x"], "unknown model"),
        (["train", "--data", "cifar"], "unknown dataset"),
        (["train", "--optimizer", "lion"], "unknown optimizer"),
        (["train", "--epochs", "0"], "--epochs"),
        (["train", "--model", "resnet152"], "fine-tune resnet152 on an image folder with `ttadapt finetune`"),
        (["train", "--model", "model_c"], "model_c takes token ids and mnist5k gives 1×28×28 grey images; datasets for model_c: imdb"),
        (["train", "--model", "model_a", "--data", "imdb"], "model_a takes 1×28×28 grey images and imdb gives token ids"),
        (["train", "--data", "mnist", "--root", str(tmp_path)], "download"),
    ):
        result = runner.invoke(app, args, terminal_width=200)
        assert result.exit_code == 2, (args, result.output)
        assert text in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("args, text", [
    (["inspect", "--model", "resnet18", "--batch", "0"], "--batch must be >= 1, got 0"),
    (["inspect", "--model", "resnet18", "--input-size", "3", "0", "8"], "--input-size must be positive, got 3 0 8"),
    (["train", "--model", "model_b", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["train", "--model", "model_b", "--lr", "-1"], "--lr must be > 0, got -1.0"),
    (["adapt", "--steps", "-2"], "--steps must be >= 0, got -2"),
    (["adapt", "--lr", "0"], "--lr must be > 0, got 0.0"),
    (["adapt", "--top-k", "0"], "--top-k must be >= 1, got 0"),
    (["adapt", "--severity", "9"], "--severity must be 1-5, got 9"),
    (["adapt", "--batch-size", "5000"], "--batch-size must be 1-1000, got 5000"),
    (["adapt", "--steps", "-1", "--lr", "0"], "--steps must be >= 0, got -1; --lr must be > 0, got 0.0"),
])
def test_an_option_out_of_range_is_named_with_its_value(args, text):
    result = runner.invoke(app, args, terminal_width=300)
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: {text}"


def test_check_writable_refuses_what_cannot_take_a_file_and_creates_nothing(tmp_path):
    import sys

    from ttadapt.atomic import check_writable, write_bytes_atomically

    check_writable(tmp_path / "new" / "deeper" / "x.pt")  # missing folders are fine: they get created
    assert sorted(tmp_path.iterdir()) == []
    with pytest.raises(IsADirectoryError, match="is a directory; give a file name inside it"):
        check_writable(tmp_path)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        write_bytes_atomically(tmp_path, b"x")
    (tmp_path / "f").write_text("data")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        check_writable(tmp_path / "f" / "x.pt")
    assert (tmp_path / "f").read_text() == "data"
    if sys.platform.startswith("linux"):  # a file system that takes no new files, even for root
        with pytest.raises(PermissionError, match="/proc does not take new files"):
            check_writable("/proc/ttadapt-nowhere/x.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_check_output_folder(tmp_path):
    import sys

    from ttadapt.atomic import check_output_folder

    check_output_folder(tmp_path / "new" / "run")  # created later, by the command
    check_output_folder(tmp_path)
    (tmp_path / "f").write_text("data")
    with pytest.raises(NotADirectoryError, match="f is a file, not a folder"):
        check_output_folder(tmp_path / "f")
    with pytest.raises(NotADirectoryError, match="cannot write into .*f/run: .*f is not a directory"):
        check_output_folder(tmp_path / "f" / "run")
    if sys.platform.startswith("linux"):
        with pytest.raises(PermissionError, match="cannot write into /proc/ttadapt-x: /proc does not take new files"):
            check_output_folder("/proc/ttadapt-x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"] and (tmp_path / "f").read_text() == "data"


def test_an_unwritable_output_fails_before_the_work(tmp_path):
    (tmp_path / "f").write_text("")
    for args, text in (
        (["train", "--model", "model_b", "--out", str(tmp_path)], "--out: "),
        (["train", "--model", "model_b", "--out", str(tmp_path / "f" / "b.pt")], "--out: "),
        (["adapt", "--model", "model_b", "--batch", str(tmp_path), "--save", str(tmp_path / "f" / "w.pt")], "--save: "),
        (["adapt", "--model", "model_b", "--batch", str(tmp_path), "--output", str(tmp_path / "f" / "p.json")], "--output: "),
        (["adapt", "--save", str(tmp_path / "w.pt")], "--save and --output need --model"),
        (["bench", str(RECIPES / "tiny.yaml"), "--out", str(tmp_path / "f")], "is a file, not a folder"),
        (["finetune", str(RECIPES / "finetune_tiny.yaml"), f"out={tmp_path / 'f'}"], "out: "),
    ):
        result = runner.invoke(app, args, terminal_width=300)
        assert result.exit_code == 2, (args, result.output)
        assert text in result.output and len(result.output.strip().splitlines()) == 1, (args, result.output)
        assert "train loss" not in result.output  # refused before any epoch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_the_package_and_the_command_line_import_without_torch():
    # `ttadapt --version` / `--help` answer in a fraction of a second: importing the package and
    # its command line must not import PyTorch or torchvision (seconds); the public names load on use.
    import subprocess
    import sys

    code = ("import sys, ttadapt, ttadapt.cli; "
            "assert not {'torch', 'torchvision'} & set(sys.modules), sorted(m for m in sys.modules if 'torch' in m)[:5]; "
            "assert all(getattr(ttadapt, n) is not None for n in ttadapt.__all__); "
            "assert 'torchvision' not in sys.modules, 'torchvision is for the ResNets only'; "
            "from ttadapt import AG3, Adapter; import ttadapt.optim as o; assert AG3 is o.AG3")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_inspect_builds_torchvision_models_offline_at_their_own_input_size(monkeypatch):
    import torch

    def no_downloads(*args, **kwargs):
        raise AssertionError("inspect tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_downloads)
    # a segmentation model (its backbone's ImageNet weights used to be fetched), inception at the
    # 299 its weights' transforms crop to (224 is too small for it), a video model (16 frames)
    for name, text in (("fcn_resnet50", "classifier.2"), ("inception_v3", "Mixed_7c"), ("r3d_18", "layer4.1.relu")):
        result = runner.invoke(app, ["inspect", "--model", name], terminal_width=200)
        assert result.exit_code == 0, (name, result.output)
        assert text in result.output and "Traceback" not in result.output and "warn" not in result.output.lower()
    result = runner.invoke(app, ["inspect", "--model", "ssdlite320_mobilenet_v3_large"], terminal_width=300)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "does not run on input (2, 3, 224, 224): targets should not be none" in result.output
