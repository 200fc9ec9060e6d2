"""The model zoo: parameter counts against the paper, shapes, activation swaps, weights files."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

import ttadapt
from ttadapt import models as zoo
from ttadapt.models import WeightsError


def test_list_models_names_the_zoo():
    assert zoo.list_models() == ["model_a", "model_b", "model_c", "resnet152", "resnet152_gelu", "resnet152_silu", "resnet152_sigmoid"]
    assert zoo.list_models("resnet152_*") == ["resnet152_gelu", "resnet152_silu", "resnet152_sigmoid"]


@pytest.mark.parametrize("name,count", [("model_a", 17_502), ("model_b", 8_228), ("model_c", 14_403)])
def test_small_model_parameter_counts(name, count):
    assert zoo.count_parameters(zoo.create(name)) == count
    # within 0.1 % of the paper's Table 1 (Model B exactly)
    paper = zoo.model_info(name).paper_parameters
    assert abs(count - paper) <= 0.001 * paper
    if name == "model_b":
        assert count == paper == 8_228


@pytest.mark.parametrize("name", ["resnet152", "resnet152_gelu", "resnet152_silu", "resnet152_sigmoid"])
def test_resnet152_variants(name):
    model = zoo.create(name)
    assert zoo.count_parameters(model) == 60_192_808
    act = name.split("_")[1] if "_" in name else "relu"
    if act != "relu":
        assert not any(isinstance(m, nn.ReLU) for m in model.modules())
        report = ttadapt.inspect(model.eval(), torch.rand(1, 3, 32, 32))
        calls = {c.call for c in report.averaged}
        assert "relu" not in calls and {"gelu": "gelu", "silu": "silu", "sigmoid": "sigmoid"}[act] in calls
        assert not report.unaveraged
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 3, 64, 64)).shape == (1, 1000)


@pytest.mark.parametrize("name,x,classes", [
    ("model_a", torch.rand(3, 1, 28, 28), 10),
    ("model_b", torch.rand(3, 1, 28, 28), 10),
    ("model_c", torch.randint(0, 2000, (3, 40)), 2),
])
def test_forward_shapes_and_num_classes(name, x, classes):
    assert zoo.create(name)(x).shape == (3, classes)
    assert zoo.create(name, num_classes=7)(x).shape == (3, 7)


def test_model_c_ignores_padding():
    m = zoo.create("model_c").eval()
    tokens = torch.randint(2, 2000, (2, 10))
    padded = torch.cat([tokens, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    # padding positions are masked out of the mean, but the convolutions see them at the border
    assert m(padded).shape == (2, 2)
    with pytest.raises(TypeError, match="token ids"):
        m(torch.rand(2, 10))


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="available: model_a, model_b"):
        zoo.create("resnet15")
    with pytest.raises(ValueError, match="num_classes"):
        zoo.create("model_a", num_classes=0)
    with pytest.raises(WeightsError, match="named weights: 'mnist5k'"):
        zoo.create("model_a", weights="cifar")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dict_round_trip_through_a_file(tmp_path, suffix):
    torch.manual_seed(0)
    model = zoo.create("model_b")
    path = tmp_path / f"b{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(path))
    loaded = zoo.create("model_b", weights=path)
    for (n, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n
    # a different head size keeps the backbone and replaces the classifier
    five = zoo.create("model_b", weights=path, num_classes=5)
    assert five(torch.rand(2, 1, 28, 28)).shape == (2, 5)
    assert torch.equal(five[0].weight, model[0].weight)


def test_wrong_shapes_missing_and_unexpected_keys_are_named(tmp_path):
    state = zoo.create("model_a").state_dict()
    state["0.weight"] = torch.zeros(3, 1, 3, 3)
    del state["2.bias"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError) as err:
        zoo.create("model_a", weights=path)
    msg = str(err.value)
    assert "1 missing (2.bias)" in msg and "1 unexpected (extra.weight)" in msg
    assert "0.weight (3, 1, 3, 3) vs model (16, 1, 3, 3)" in msg


class _Evil:
    def __reduce__(self):
        return (print, ("this ran",))


def test_a_pickle_carrying_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"0.weight": _Evil()}, fh)
    with pytest.raises(WeightsError, match="refused"):
        zoo.create("model_a", weights=path)
    assert "this ran" not in capsys.readouterr().out
    with pytest.raises(WeightsError, match="does not exist"):
        zoo.create("model_a", weights=tmp_path / "nope.pt")


def test_imagenet_weights_come_from_the_hub_cache_only(tmp_path):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        with pytest.raises(WeightsError, match=r"resnet152-f82ba261\.pth.*download=True"):
            zoo.create("resnet152", weights="imagenet")
        torch.manual_seed(0)
        reference = zoo.create("resnet152")
        (tmp_path / "checkpoints").mkdir()
        torch.save(reference.state_dict(), tmp_path / "checkpoints" / "resnet152-394f9c45.pth")  # the V1 file
        loaded = zoo.create("resnet152_silu", weights="imagenet", num_classes=200)
        assert torch.equal(loaded.conv1.weight, reference.conv1.weight)
        assert loaded.fc.out_features == 200
    finally:
        torch.hub.set_dir(old)


def test_a_download_that_fails_is_one_line_naming_the_file(tmp_path, monkeypatch):
    import urllib.error

    def offline(url, **kwargs):
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        with pytest.raises(WeightsError) as err:
            zoo.create("resnet152", weights="imagenet", download=True)
    finally:
        torch.hub.set_dir(old)
    message = str(err.value)
    assert "\n" not in message and "could not download ImageNet weights for resnet152" in message
    assert "Name or service not known" in message and str(tmp_path / "checkpoints" / "resnet152-f82ba261.pth") in message


@pytest.mark.parametrize("name", ["model_a", "model_b"])
def test_shipped_checkpoints_reach_their_recorded_accuracy(name):
    from ttadapt.data import load
    from ttadapt.models.weights import read_state_dict, shipped_checkpoint
    from ttadapt.training import evaluate

    _, meta = read_state_dict(shipped_checkpoint(name, "mnist5k"))
    model = zoo.create(name, weights="mnist5k")
    loss, acc = evaluate(model, load("mnist5k", "test"))
    assert acc == pytest.approx(meta["test_accuracy"], abs=1e-9)
    assert loss == pytest.approx(meta["test_loss"], rel=1e-4)
    assert acc >= 0.9
