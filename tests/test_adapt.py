"""Test-time adaptation: the Adapter's state handling, its methods on shifted mnist5k with the
shipped checkpoint, and the `ttadapt adapt` command."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import ttadapt
from ttadapt import Adapter, data, models
from ttadapt.cli import app

runner = CliRunner()


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 10))


@pytest.fixture(scope="module")
def shifted():
    x, y = data.load("mnist5k", "test").tensors
    xs = data.shifts.apply(x[:64], "brightness", 3, seed=0)
    return xs, y[:64]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["grad", "ag1", "ag2", "ag2_linear", "sam"])
@pytest.mark.parametrize("opt", ["rmsprop", "adam", "soap"])
def test_reset_and_episodic_restore_everything_bit_for_bit(method, opt):
    model = bn_net()
    x = torch.rand(16, 1, 28, 28)
    adapter = Adapter(model, method=method, optimizer=opt, lr=1e-2, steps=3, params="all", episodic=False,
                      collapse_guard=False)
    initial = _state(model)
    opt_state = copy.deepcopy(adapter.optimizer.state_dict())
    first = adapter(x)
    assert any(not torch.equal(initial[k], v) for k, v in model.state_dict().items() if "weight" in k)
    adapter.reset()
    assert all(torch.equal(initial[k], v) for k, v in model.state_dict().items())
    assert adapter.optimizer.state_dict() == opt_state or not adapter.optimizer.state
    # episodic: every call starts from the initial state, so the same batch gives the same logits
    adapter.episodic = True
    again = adapter(x)
    again2 = adapter(x)
    assert torch.equal(again, again2) and torch.equal(again, first)


def test_method_none_is_the_plain_model(shifted):
    x, _ = shifted
    model = models.create("model_b", weights="mnist5k").eval()
    with torch.no_grad():
        plain = model(x)
    assert torch.equal(Adapter(copy.deepcopy(model), method="none")(x), plain)


def test_norm_uses_test_batch_statistics_and_keeps_running_stats():
    model = bn_net()
    running = model[1].running_mean.clone()
    x = torch.rand(16, 1, 28, 28) * 3 + 1
    out = Adapter(model, method="norm")(x)
    reference = copy.deepcopy(model).train()
    with torch.no_grad():
        assert torch.allclose(out, reference(x), atol=1e-6)
    assert torch.equal(model[1].running_mean, running)


def test_a_batch_of_one_uses_the_running_statistics():
    """One sample has no batch statistics: BatchNorm normalises it with its running statistics
    (as the source model does), for the updates and the prediction, then returns to test-batch
    statistics; the report and one warning say so."""
    model = bn_net()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    x = torch.rand(1, 1, 28, 28) * 3 + 1
    reference = copy.deepcopy(model).eval()  # the oracle: the model in eval mode, one SGD step on the entropy
    norm_params = list(reference[1].parameters())
    sgd = torch.optim.SGD(norm_params, lr=0.5)
    ttadapt.adapt.entropy(reference(x)).mean().backward()
    sgd.step()
    with torch.no_grad():
        want = reference(x)
    running = model[1].running_mean.clone()
    adapter = Adapter(model, method="grad", optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5), steps=1, episodic=False)
    with pytest.warns(RuntimeWarning, match="batch of one sample"):
        out = adapter(x)
    torch.testing.assert_close(out, want)
    assert adapter.last_report.source_statistics and model[1].training  # back to test-batch statistics
    assert torch.equal(model[1].running_mean, running)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not per batch
        adapter(x)
    adapter(torch.rand(4, 1, 28, 28))
    assert not adapter.last_report.source_statistics


@pytest.mark.parametrize("method", ["norm", "grad", "ag2", "sam"])
def test_a_batch_of_one_through_batchnorm1d(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    adapter = Adapter(model, method=method, steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = adapter(torch.randn(1, 6))  # BatchNorm1d in train mode refuses one sample
    assert out.shape == (1, 3) and torch.isfinite(out).all()
    assert adapter.predict_only(torch.randn(1, 6)).shape == (1, 3)


@pytest.mark.parametrize("method", ["grad", "ag2", "sam"])
def test_an_empty_batch_is_predicted_without_adapting(method):
    """The last, empty batch of a stream: logits of shape (0, classes), the model and its
    running statistics as they were, no rollback and no warning."""
    model = bn_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = Adapter(model, method=method, episodic=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = adapter(torch.rand(0, 1, 28, 28))
    assert out.shape == (0, 10) and adapter.last_report.steps == 0 and not adapter.last_report.rolled_back
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ["grad", "ag1", "ag2"])
def test_entropy_decreases_on_shifted_digits(shifted, method):
    x, _ = shifted
    adapter = Adapter(models.create("model_b", weights="mnist5k"), method=method, lr=1e-4, steps=5, params="all")
    adapter(x)
    report = adapter.last_report
    assert not report.rolled_back and report.loss_after < report.loss_before


def test_few_shot_ce_raises_accuracy_on_the_labelled_batch(shifted):
    x, y = shifted
    model = models.create("model_b", weights="mnist5k")
    with torch.no_grad():
        before = (model.eval()(x).argmax(1) == y).float().mean()
    out = Adapter(model, method="ag2", loss="ce", optimizer="adam", lr=3e-3, steps=10, params="all")(x, y)
    after = (out.argmax(1) == y).float().mean()
    assert after > before + 0.1


def test_filtered_entropy_ignores_unreliable_samples():
    adapter = Adapter(bn_net(), method="grad", loss="filtered_entropy", params="all")
    logits = torch.tensor([[10.0, 0, 0, 0, 0, 0, 0, 0, 0, 0], [0.0] * 10])  # confident, uniform
    loss = adapter.objective(logits, None)
    assert torch.allclose(loss, ttadapt.adapt.entropy(logits[:1]).mean())


def test_collapse_is_rolled_back_and_reported():
    model = bn_net()
    x = torch.rand(32, 1, 28, 28)
    adapter = Adapter(model, method="grad", optimizer="sgd", lr=50.0, steps=5, params="all", episodic=False)
    with torch.no_grad():
        before = copy.deepcopy(model).eval()
        for m in before.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.train()
                m.momentum = 0.0
        reference = before(x)
    state = _state(model)
    with pytest.warns(RuntimeWarning, match="rolled back"):
        out = adapter(x)
    assert adapter.last_report.rolled_back and adapter.rolled_back == 1
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.allclose(out, reference, atol=1e-6)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("method", ["grad", "ag2", "sam"])
def test_adapting_inside_an_inference_pipeline(context, method):
    """An inference pipeline runs under no_grad or inference_mode: the adapter takes its gradients
    anyway (as TENT's forward does) — the same logits and parameters as outside it. Under
    no_grad, "grad" used to skip every update silently; under inference_mode AG-2 failed."""
    g = torch.Generator().manual_seed(3)
    results = []
    for ctx in ("enable_grad", context):
        model = bn_net()
        adapter = Adapter(model, method=method, steps=2, params="all")
        with getattr(torch, ctx)():
            x = torch.rand(8, 1, 28, 28, generator=g.manual_seed(3))
            out = adapter(x)
        results.append((out, [p.detach().clone() for p in model.parameters()]))
    (want, want_params), (got, got_params) = results
    assert torch.equal(got, want) and not got.is_inference()
    assert all(torch.equal(a, b) for a, b in zip(got_params, want_params))
    assert not all(torch.equal(a, b) for a, b in zip(got_params, [p.detach() for p in bn_net().parameters()]))


def test_hugging_face_style_outputs():
    class HF(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = bn_net()

        def forward(self, x):
            return {"logits": self.net(x)}

    out = Adapter(HF(), method="ag1", params="norm", lr=1e-3)(torch.rand(8, 1, 28, 28))
    assert out.shape == (8, 10)


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0))


class _PositionalBert(nn.Module):
    """The same model called with one tensor (the path every other test checks): the oracle."""

    def __init__(self, bert, mask):
        super().__init__()
        self.bert, self.mask = bert, mask

    def forward(self, input_ids):
        return self.bert(input_ids=input_ids, attention_mask=self.mask).logits


@pytest.mark.parametrize("method", ["grad", "ag2", "ag1_linear", "sam"])
def test_keyword_inputs_and_a_tokenizers_mapping(method):
    """A Hugging Face model takes its batch as keywords: adapter(**batch), adapter(batch) for a
    mapping whose keys name forward's parameters (a tokenizer's output), and predict_only alike —
    each bit for bit the same model called with one positional tensor."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (6, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[:2, 6:] = 0  # padded rows: the mask must reach the model
    batch = {"input_ids": ids, "attention_mask": mask}
    results = []
    for call in ("positional", "keywords", "mapping"):
        bert = _tiny_bert()
        model = _PositionalBert(bert, mask) if call == "positional" else bert
        adapter = Adapter(model, method=method, params="norm", steps=2, lr=1e-3)
        out = {"positional": lambda: adapter(ids), "keywords": lambda: adapter(**batch), "mapping": lambda: adapter(batch)}[call]()
        again = adapter.predict_only(ids) if call == "positional" else adapter.predict_only(**batch)
        results.append((out, again, [p.detach().clone() for p in bert.parameters()]))
    (want, want_again, want_params), *others = results
    assert any(not torch.equal(a, b) for a, b in zip(want_params, _tiny_bert().parameters()))  # it adapted
    for out, again, params in others:
        assert torch.equal(out, want) and torch.equal(again, want_again)
        assert all(torch.equal(a, b) for a, b in zip(params, want_params))
    unmasked = Adapter(_tiny_bert(), method=method, params="norm", steps=2, lr=1e-3)(ids)
    assert not torch.equal(unmasked, want)  # (the mask mattered)


def test_a_mapping_the_forward_does_not_name_is_passed_as_it_is():
    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = bn_net()

        def forward(self, batch):
            return self.net(batch["image"]) * batch["scale"]

    x = torch.rand(8, 1, 28, 28)
    model = DictModel()
    out = Adapter(model, method="grad", params="norm", lr=1e-3)({"image": x, "scale": 2.0})
    assert out.shape == (8, 10)
    with pytest.raises(TypeError, match="needs the model's input"):
        Adapter(bn_net(), method="grad", params="norm")()


def test_a_tokenizers_mapping_through_a_pass_through_wrapper():
    from ttadapt.adapt import _names_forward_parameters

    class PassThrough(nn.Module):  # the shape of DDP's and torch.compile's wrappers
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    class TakesTheDict(nn.Module):  # holds a `module` too, but its forward names its one input
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, batch):
            return self.module(**batch)

    ids = torch.randint(1, 50, (4, 6), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert _names_forward_parameters(PassThrough(_tiny_bert()), batch)
    assert not _names_forward_parameters(TakesTheDict(_tiny_bert()), batch)
    want = Adapter(_tiny_bert(), method="grad", params="norm", lr=1e-3)(**batch)
    for wrapper in (PassThrough, TakesTheDict):
        assert torch.equal(Adapter(wrapper(_tiny_bert()), method="grad", params="norm", lr=1e-3)(batch), want)


def test_keyword_inputs_made_under_inference_mode_and_of_one_sample():
    bert = _tiny_bert()
    adapter = Adapter(bert, method="ag2", params="norm", lr=1e-3)
    with torch.inference_mode():
        ids = torch.randint(1, 50, (3, 5))
        out = adapter(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert out.shape == (3, 3) and not out.is_inference() and adapter.last_report.steps == 1
    conv = Adapter(bn_net(), method="ag2", params="norm", lr=1e-3)
    empty = conv(input=torch.zeros(0, 1, 28, 28))  # (nn.Sequential's forward calls it `input`)
    assert empty.shape == (0, 10) and conv.last_report.steps == 0  # nothing to adapt on
    with pytest.warns(RuntimeWarning, match="a batch of one sample"):
        conv(input=torch.rand(1, 1, 28, 28))
    assert conv.last_report.source_statistics


def test_bad_arguments():
    for kwargs, text in (({"method": "tent"}, "unknown method"), ({"loss": "mse"}, "unknown loss"),
                         ({"predict": "during"}, "predict"), ({"steps": -1}, "steps"), ({"lr": 0}, "lr")):
        with pytest.raises(ValueError, match=text):
            Adapter(bn_net(), **kwargs)
    with pytest.raises(ValueError, match="selects no parameters"):
        Adapter(models.create("model_b"), method="grad", params="norm")
    with pytest.raises(ValueError, match="adapter\\(x, y\\)"):
        Adapter(bn_net(), method="grad", loss="ce", params="all")(torch.rand(4, 1, 28, 28))


# -- command line ----------------------------------------------------------------------------
def test_cli_default_demo_runs():
    result = runner.invoke(app, ["adapt", "--steps", "2", "--batch-size", "32"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for text in ("none", "grad", "ag1", "ag2", "accuracy", "brightness"):
        assert text in result.output


def _folder(tmp_path, n=3, size=40):
    from PIL import Image

    root = tmp_path / "imgs"
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()).save(root / f"im{i}.png")
    return root


def test_cli_resnet152_on_an_image_folder(tmp_path):
    root = _folder(tmp_path)
    labels = tmp_path / "labels.txt"
    labels.write_text("1\n2\n3\n")
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    out_json, out_csv, saved = tmp_path / "pred.json", tmp_path / "pred.csv", tmp_path / "adapted.safetensors"
    result = runner.invoke(app, ["adapt", "--model", "resnet152", "--batch", str(root), "--labels", str(labels),
                                 "--method", "ag1", "--steps", "1", "--output", str(out_json), "--save", str(saved)],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    records = json.loads(out_json.read_text())
    assert [r["input"] for r in records] == ["im0.png", "im1.png", "im2.png"]
    assert len(records[0]["top"]) == 5 and records[0]["top"][0]["name"]  # ImageNet class names
    assert models.create("resnet152", weights=saved) is not None
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before  # inputs untouched
    result = runner.invoke(app, ["adapt", "--model", "resnet152", "--batch", str(root / "*.png"), "--method", "none",
                                 "--output", str(out_csv), "--top-k", "2"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert out_csv.read_text().splitlines()[0] == "input,rank,class,name,probability"
    assert len(out_csv.read_text().splitlines()) == 1 + 3 * 2


def test_a_folder_gives_its_images_and_leaves_other_files(tmp_path):
    root = _folder(tmp_path)
    (root / "labels.txt").write_text("1\n2\n3\n")  # beside the images, as users keep them
    (root / "README.md").write_text("three digits\n")
    out = tmp_path / "pred.json"
    result = runner.invoke(app, ["adapt", "--model", "model_b", "--batch", str(root), "--labels", str(root / "labels.txt"),
                                 "--method", "none", "--output", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert [r["input"] for r in json.loads(out.read_text())] == ["im0.png", "im1.png", "im2.png"]


def test_a_tensor_batch_outside_the_models_preprocessing_is_warned_about(tmp_path):
    from ttadapt.batches import input_range_note

    g = torch.Generator().manual_seed(0)
    unit = torch.rand(2, 3, 8, 8, generator=g)
    normalised = (unit - 0.45) / 0.225
    assert "[0, 1]" in input_range_note(unit, "imagenet")
    assert "0-255" in input_range_note(unit * 255, "imagenet") and "0-255" in input_range_note(unit[:, :1] * 255, "mnist")
    assert "not normalised" in input_range_note(normalised[:, :1], "mnist")
    assert input_range_note(normalised, "imagenet") is None and input_range_note(unit[:, :1], "mnist") is None
    path = tmp_path / "raw.pt"
    torch.save(torch.rand(2, 1, 28, 28, generator=g) * 255, path)
    result = runner.invoke(app, ["adapt", "--model", "model_b", "--batch", str(path), "--method", "none"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "warning: the batch's values reach" in result.output


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    root = _folder(tmp_path)
    (tmp_path / "empty").mkdir()
    notimg = tmp_path / "notimg"
    notimg.mkdir()
    (notimg / "a.png").write_text("not an image")
    textonly = tmp_path / "textonly"
    textonly.mkdir()
    (textonly / "labels.txt").write_text("1\n")
    two = tmp_path / "two.txt"
    two.write_text("1\n2\n")
    big = tmp_path / "big.txt"
    big.write_text("1\n2\n5000\n")
    gray = tmp_path / "gray.pt"
    torch.save(torch.rand(2, 1, 64, 64), gray)
    bad_weights = tmp_path / "w.pt"
    torch.save({"fc.weight": torch.zeros(3, 3)}, bad_weights)
    cases = [
        (["adapt", "--model", "resnet9"], "unknown model"),
        (["adapt", "--method", "tent"], "unknown method"),
        (["adapt", "--loss", "mse"], "unknown loss"),
        (["adapt", "--model", "resnet152"], "--batch is required"),
        (["adapt", "--model", "resnet152", "--batch", str(tmp_path / "missing")], "does not exist"),
        (["adapt", "--model", "resnet152", "--batch", str(tmp_path / "empty")], "is empty"),
        (["adapt", "--model", "resnet152", "--batch", str(notimg)], "is not an image"),
        (["adapt", "--model", "resnet152", "--batch", str(textonly)], "holds no images"),
        (["adapt", "--model", "resnet152", "--batch", str(gray)], "3-channel"),
        (["adapt", "--model", "resnet152", "--batch", str(root), "--labels", str(two)], "2 labels for a batch of 3"),
        (["adapt", "--model", "resnet152", "--batch", str(root), "--labels", str(big)], "class indices from 0 to 999"),
        (["adapt", "--model", "resnet152", "--batch", str(root), "--weights", str(bad_weights)], "does not fit"),
        (["adapt", "--model", "resnet152", "--batch", str(root), "--loss", "ce"], "--labels"),
        (["adapt", "--model", "model_b", "--batch", str(root), "--output", str(tmp_path / "p.txt")], "use one of"),
        (["adapt", "--model", "model_b", "--batch", str(root)],
         "--params norm selects no parameters of the model (the model has no normalisation layers: use --params all"),
        (["adapt", "--model", "model_b", "--batch", str(root), "--params", "head*,tail*"], "--params head*,tail* selects no"),
    ]
    for args, text in cases:
        result = runner.invoke(app, args, terminal_width=300)
        assert result.exit_code == 2, (args, result.output)
        assert text in result.output, (args, result.output)
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_a_rejected_configuration_leaves_the_model_untouched():
    model = models.create("model_b")
    flags = [p.requires_grad for p in model.parameters()]
    training = model.training
    with pytest.raises(ValueError, match="no normalisation layers"):
        Adapter(model, method="ag1", params="norm")
    assert [p.requires_grad for p in model.parameters()] == flags and model.training == training
