"""IMDb-style sentiment data and the small word-level vocabulary Model C reads."""

from __future__ import annotations

import collections
import os
import re
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from .images import DataError, _check_split

__all__ = ["Vocabulary", "imdb", "tokenize"]

_WORD = re.compile(r"[a-z0-9']+")
_TAG = re.compile(r"<[^>]+>")


def tokenize(text: str) -> list[str]:
    """Lower-case words (letters, digits, apostrophes), HTML tags such as ``<br />`` dropped."""
    return _WORD.findall(_TAG.sub(" ", text.lower()))


class Vocabulary:
    """Word → id, ids 0 = padding and 1 = unknown, then words by decreasing training frequency
    (ties alphabetical). ``encode`` gives fixed-length rows of ids (cut or padded)."""

    PAD, UNK = 0, 1

    def __init__(self, words: list[str]) -> None:
        self.words = list(words)
        self.index = {w: i + 2 for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, texts: Iterable[str], size: int = 2000) -> "Vocabulary":
        counts = collections.Counter(w for t in texts for w in tokenize(t))
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return cls([w for w, _ in ranked[: size - 2]])

    def __len__(self) -> int:
        return len(self.words) + 2

    def encode(self, texts: Iterable[str], length: int = 128) -> Tensor:
        rows = []
        for t in texts:
            ids = [self.index.get(w, self.UNK) for w in tokenize(t)][:length]
            rows.append(ids + [self.PAD] * (length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(-1, length)


def _read_acl_imdb(root: Path, split: str) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    for label, name in ((0, "neg"), (1, "pos")):
        folder = root / split / name
        if not folder.is_dir():
            raise DataError(f"{root} is not in the aclImdb layout: {folder} is missing (expected {split}/pos and {split}/neg with .txt files)")
        for f in sorted(folder.glob("*.txt")):
            texts.append(f.read_text(encoding="utf-8", errors="replace"))
            labels.append(label)
    return texts, labels


def _read_with_datasets(root: Path | None, split: str, download: bool) -> tuple[list[str], list[int]]:
    try:
        import datasets
    except ImportError as exc:
        raise DataError("reading IMDb from data files or the hub needs the 'datasets' package (pip install datasets)") from exc
    if root is None:
        if not download:
            raise DataError("IMDb is not available locally: give the aclImdb folder or a folder of parquet/csv/json files "
                            "(columns text, label), or allow fetching it from the Hugging Face hub with download=True (`ttadapt train --download`; `download: true` in a recipe's data options)")
        ds = datasets.load_dataset("stanfordnlp/imdb", split=split)
    else:
        files = sorted(p for p in root.iterdir() if p.suffix in (".parquet", ".csv", ".json", ".jsonl") and split in p.name)
        if not files:
            raise DataError(f"{root} holds neither the aclImdb layout nor {split} data files (*{split}*.parquet/csv/json)")
        kind = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}[files[0].suffix]
        ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    if "text" not in ds.column_names or "label" not in ds.column_names:
        raise DataError(f"IMDb data needs columns 'text' and 'label', found {ds.column_names}")
    return list(ds["text"]), [int(v) for v in ds["label"]]


def imdb(split: str = "train", root: str | os.PathLike | None = None, *, vocab_size: int = 2000, length: int = 128,
         download: bool = False, vocabulary: Vocabulary | None = None) -> TensorDataset:
    """IMDb reviews as ``(token ids (N, length), labels)`` for Model C.

    ``root``: the ``aclImdb`` folder (``train/pos``, ``train/neg``, ``test/...``) or a folder of
    parquet/csv/json files with ``text``/``label`` columns (read through Hugging Face
    ``datasets``); without ``root``, the hub only when ``download=True``. The vocabulary is built
    from the training split (or given); the dataset carries it as ``.vocabulary``.
    """
    _check_split(split)
    path = Path(root) if root is not None else None
    if path is not None and not path.is_dir():
        raise DataError(f"IMDb folder {str(path)!r} does not exist")

    def read(which: str) -> tuple[list[str], list[int]]:
        if path is not None and (path / which).is_dir():
            return _read_acl_imdb(path, which)
        return _read_with_datasets(path, which, download)

    texts, labels = read(split)
    if vocabulary is None:
        vocabulary = Vocabulary.build(texts if split == "train" else read("train")[0], vocab_size)
    ds = TensorDataset(vocabulary.encode(texts, length), torch.tensor(labels, dtype=torch.long))
    ds.vocabulary = vocabulary  # type: ignore[attr-defined]
    return ds
