"""Datasets and distribution shifts, on the shipped MNIST subset and on fixtures made here."""

from __future__ import annotations

import json

import pytest
import torch

from ttadapt import data
from ttadapt.data import DataError, shifts


def test_mnist5k_split():
    train, test = data.load("mnist5k", "train"), data.load("mnist5k", "test")
    assert len(train) == 4000 and len(test) == 1000
    (xtr, ytr), (xte, yte) = train.tensors, test.tensors
    assert xtr.shape == (4000, 1, 28, 28) and xtr.dtype == torch.float32
    assert 0.0 <= float(xtr.min()) and float(xtr.max()) <= 1.0
    assert set(ytr.tolist()) == set(range(10)) and set(yte.tolist()) == set(range(10))
    # disjoint: no test image appears in the training split
    keys = {hash(row.numpy().tobytes()) for row in (xtr * 255).round().to(torch.uint8).flatten(1)}
    assert not any(hash(row.numpy().tobytes()) in keys for row in (xte * 255).round().to(torch.uint8).flatten(1))
    # the same split every time
    assert torch.equal(data.load("mnist5k", "test").tensors[1], yte)


def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(DataError, match="available: mnist5k, mnist, fashion_mnist, imdb, imagefolder"):
        data.load("cifar10")
    with pytest.raises(DataError, match="split"):
        data.load("mnist5k", "validation")


def test_torchvision_datasets_missing_locally_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="download=True"):
        data.load("fashion_mnist", "train", root=tmp_path)


def test_a_dataset_download_that_fails_is_one_line(tmp_path, monkeypatch):
    import torchvision

    class Offline:
        def __init__(self, root, train, download):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://a/, got:\n<urlopen error>\n")

    monkeypatch.setattr(torchvision.datasets, "MNIST", Offline)
    with pytest.raises(DataError) as err:
        data.load("mnist", "train", root=tmp_path, download=True)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"MNIST could not be fetched into {tmp_path} (Error downloading")


def _batches():
    torch.manual_seed(0)
    gray = data.load("mnist5k", "test").tensors[0][:16]
    # smooth colour images (photos are not white noise): upsampled coarse noise
    color = torch.nn.functional.interpolate(torch.rand(4, 3, 8, 8), size=(64, 64), mode="bilinear") * 0.6 + 0.2
    return {"gray": gray, "color": color}


@pytest.mark.parametrize("shift", shifts.list_shifts())
@pytest.mark.parametrize("kind", ["gray", "color"])
def test_shift_properties(shift, kind):
    x = _batches()[kind]
    outs = [shifts.apply(x, shift, s, seed=1) for s in range(1, 6)]
    for out in outs:
        assert out.shape == x.shape and out.dtype == x.dtype
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # deterministic per seed; a single image gives the batch's first image for a seed-free shift
    assert torch.equal(shifts.apply(x, shift, 3, seed=1), outs[2])
    assert shifts.apply(x[0], shift, 3, seed=1).shape == x[0].shape
    dist = [float((o - x).square().mean()) for o in outs]
    assert dist[-1] > dist[0]
    if shift == "pixelate":
        # monotone in resolution: the number of distinct columns falls with severity (the pixel
        # error need not: a block grid that divides the image, as 0.5 does, aliases less than 0.6)
        cols = [int((o[..., 1:] != o[..., :-1]).any(dim=(0, 1, 2)).sum()) + 1 for o in outs]
        assert cols == sorted(cols, reverse=True) and cols[-1] < cols[0], cols
    else:  # the distance to the clean image does not shrink with severity
        assert all(b >= a * 0.98 for a, b in zip(dist, dist[1:])), dist


@pytest.mark.parametrize("shift", ["gaussian_noise", "shot_noise", "impulse_noise"])
def test_noise_depends_on_the_seed_and_grows_with_severity(shift):
    x = _batches()["color"]
    assert not torch.equal(shifts.apply(x, shift, 3, seed=1), shifts.apply(x, shift, 3, seed=2))
    energy = [float((shifts.apply(x, shift, s, seed=0) - x).square().mean()) for s in range(1, 6)]
    assert energy == sorted(energy) and energy[-1] > 2 * energy[0]


def test_bad_shift_arguments():
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="available: gaussian_noise"):
        shifts.apply(x, "fog")
    with pytest.raises(ValueError, match="severity"):
        shifts.apply(x, "contrast", 6)
    with pytest.raises(ValueError, match="channels"):
        shifts.apply(torch.rand(1, 2, 8, 8), "contrast")


def test_shifted_dataset_is_reproducible_per_index():
    base = data.load("mnist5k", "test")
    a = data.ShiftedDataset(base, "gaussian_noise", 4, seed=3)
    b = data.ShiftedDataset(base, "gaussian_noise", 4, seed=3)
    assert torch.equal(a[5][0], b[5][0]) and a[5][1] == base[5][1]
    assert not torch.equal(a[5][0], a[6][0] * 0 + a[5][0] * 0 + base[5][0])


def _image_folder(root, classes=("n01440764", "n01443537"), per_class=3, size=20):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            img = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8)
            Image.fromarray(img.numpy()).save(root / c / f"{i}.png")
    return root


def test_imagefolder_with_and_without_class_map(tmp_path):
    root = _image_folder(tmp_path / "ood")
    ds = data.load("imagefolder", root=root)
    assert len(ds) == 6 and ds[0][0].shape == (3, 20, 20) and {ds[i][1] for i in range(6)} == {0, 1}
    text_map = tmp_path / "LOC_synset_mapping.txt"
    text_map.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\nn01484850 great white shark\n")
    mapped = data.imagefolder(root, class_map=text_map)
    assert sorted({mapped[i][1] for i in range(6)}) == [0, 1]
    json_map = tmp_path / "imagenet_class_index.json"
    json_map.write_text(json.dumps({"7": ["n01440764", "tench"], "9": ["n01443537", "goldfish"]}))
    mapped = data.imagefolder(root, class_map=json_map)
    assert sorted({mapped[i][1] for i in range(6)}) == [7, 9]
    with pytest.raises(DataError, match="not in the class map: n01443537"):
        data.imagefolder(root, class_map={"n01440764": 0})
    with pytest.raises(DataError, match="does not exist"):
        data.imagefolder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        data.imagefolder(tmp_path / "empty")


REVIEWS = {
    ("train", "pos"): ["A wonderful film, truly great acting.<br />Loved it.", "Great great story!"],
    ("train", "neg"): ["Terrible plot and awful acting.", "Boring. I hated it."],
    ("test", "pos"): ["Great film."],
    ("test", "neg"): ["Awful, boring film."],
}


def _acl_imdb(root):
    for (split, label), texts in REVIEWS.items():
        folder = root / split / label
        folder.mkdir(parents=True)
        for i, t in enumerate(texts):
            (folder / f"{i}_7.txt").write_text(t)
    return root


def test_imdb_from_an_acl_imdb_folder(tmp_path):
    root = _acl_imdb(tmp_path / "aclImdb")
    train = data.load("imdb", "train", root=root, length=12)
    test = data.load("imdb", "test", root=root, length=12)
    tokens, labels = train.tensors
    assert tokens.shape == (4, 12) and labels.tolist() == [0, 0, 1, 1]
    vocab = train.vocabulary
    assert vocab.words[0] == "great"  # most frequent training word
    assert "br" not in vocab.index  # HTML line breaks are not words
    assert test.tensors[0].shape == (2, 12) and test.vocabulary.words == vocab.words
    assert (test.tensors[0][1] == vocab.UNK).sum() == 0 or "awful" in vocab.index
    from ttadapt import models

    assert models.create("model_c")(tokens).shape == (4, 2)


def test_imdb_from_data_files_through_datasets(tmp_path):
    pytest.importorskip("datasets")
    import csv

    for split in ("train", "test"):
        with open(tmp_path / f"{split}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["text", "label"])
            for (s, label), texts in REVIEWS.items():
                if s == split:
                    for t in texts:
                        w.writerow([t, 1 if label == "pos" else 0])
    ds = data.load("imdb", "train", root=tmp_path, length=8)
    assert ds.tensors[0].shape == (4, 8) and sorted(ds.tensors[1].tolist()) == [0, 0, 1, 1]


def test_imdb_missing_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="download=True"):
        data.load("imdb", "train")
    with pytest.raises(DataError, match="does not exist"):
        data.load("imdb", "train", root=tmp_path / "nope")


def _idx_files(raw, n_train=3, n_test=2):
    """Tiny MNIST files in the original IDX format, as torchvision reads them."""
    import struct

    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        pixels = (torch.rand(n, 28, 28, generator=g) * 255).to(torch.uint8)
        labels = torch.arange(n, dtype=torch.uint8)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + pixels.numpy().tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.numpy().tobytes())
    return pixels


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_torchvision_digits_from_a_local_root(tmp_path, name, folder):
    test_pixels = _idx_files(tmp_path / folder / "raw")
    train = data.load(name, "train", root=tmp_path)
    test = data.load(name, "test", root=tmp_path)
    assert len(train) == 3 and len(test) == 2
    x, y = test.tensors
    assert x.shape == (2, 1, 28, 28) and y.tolist() == [0, 1]
    assert torch.equal((x[:, 0] * 255).round().to(torch.uint8), test_pixels)
