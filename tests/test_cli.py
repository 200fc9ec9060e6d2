"""The command line, through Typer's CliRunner."""

from __future__ import annotations

from typer.testing import CliRunner

from ttadapt import __version__
from ttadapt.cli import app

runner = CliRunner()


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
