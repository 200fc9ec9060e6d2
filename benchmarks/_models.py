"""Models shared by the benchmark scripts."""

from __future__ import annotations

import torch
from torch import nn


def model_b() -> nn.Sequential:
    """The paper's Model B (spec §6) from the zoo: 8,228 parameters."""
    from ttadapt.models import ModelB

    return ModelB()


def wide_tanh_mlp(width: int = 512, depth: int = 28) -> nn.Sequential:
    """Model B's deep tanh stack made wide enough that arithmetic, not dispatch, dominates."""
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(784, width), nn.Tanh()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def small_relu_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10),
    )


class RowLSTM(nn.Module):
    """An LSTM (32 units) reading a 28 × 28 image row by row, a linear head on its last output."""

    def __init__(self) -> None:
        super().__init__()
        self.rec = nn.LSTM(28, 32, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rec(x.squeeze(1))  # (batch, 1, 28, 28) -> 28 steps of 28 features
        return self.head(out[:, -1])


class SequenceClassifier(nn.Module):
    """A recurrent classifier: per-step embedding (Linear + tanh), one LSTM or GRU layer of 128
    units, a linear head on the final hidden state; takes a padded (batch-first) or a packed
    sequence."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.embed = nn.Linear(32, 64)
        self.rec = {"lstm": nn.LSTM, "gru": nn.GRU}[kind](64, 128, batch_first=True)
        self.head = nn.Linear(128, 10)

    def forward(self, x) -> torch.Tensor:
        if isinstance(x, nn.utils.rnn.PackedSequence):
            x = x._replace(data=torch.tanh(self.embed(x.data)))
        else:
            x = torch.tanh(self.embed(x))
        _, hidden = self.rec(x)
        return self.head((hidden[0] if isinstance(hidden, tuple) else hidden)[-1])


class TinyGPT2(nn.Module):
    """A small GPT-2 from ``transformers`` (4 layers, width 256, 4 heads, vocabulary 1,000, random
    weights, its default dropout) as a next-token classifier: logits of every position, flat."""

    def __init__(self) -> None:
        super().__init__()
        import transformers

        config = transformers.GPT2Config(vocab_size=1000, n_embd=256, n_layer=4, n_head=4, n_positions=128,
                                         bos_token_id=0, eos_token_id=0)
        self.lm = transformers.GPT2LMHeadModel(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.lm(input_ids=ids).logits
        return logits.reshape(-1, logits.shape[-1])


def benchmark_case(case: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(model in train mode, inputs, labels) of a named benchmark case, seeded."""
    torch.manual_seed(0)
    if case == "resnet18":
        import torchvision

        model = torchvision.models.resnet18(weights=None, num_classes=10)
        x, y = torch.randn(16, 3, 64, 64), torch.randint(0, 10, (16,))
    elif case in ("resnet152", "resnet152_sigmoid"):
        from ttadapt.models import create

        model = create(case)  # random weights: the step costs what it costs with ImageNet's
        x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 1000, (4,))
    elif case in ("mobilenet_v3_small", "efficientnet_b0"):  # Hardswish / SiLU and sigmoid gates
        import torchvision

        model = getattr(torchvision.models, case)(weights=None, num_classes=10)
        x, y = torch.randn(16, 3, 64, 64), torch.randint(0, 10, (16,))
    elif case == "model_b":
        model = model_b()
        x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    elif case in ("lstm", "gru"):  # batch 32, 20 time steps of 32 features
        model = SequenceClassifier(case)
        x, y = torch.randn(32, 20, 32), torch.randint(0, 10, (32,))
    elif case == "lstm_packed":  # the same, packed: lengths drawn from 5..20
        model = SequenceClassifier("lstm")
        lengths = torch.randint(5, 21, (32,))
        x = nn.utils.rnn.pack_padded_sequence(torch.randn(32, 20, 32), lengths, batch_first=True, enforce_sorted=False)
        y = torch.randint(0, 10, (32,))
    elif case == "gpt2":  # batch 8 of 64 tokens; labels: the next token of each position
        model = TinyGPT2()
        tokens = torch.randint(0, 1000, (8, 65))
        x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].reshape(-1)
    elif case == "wide_tanh_mlp":
        model = wide_tanh_mlp()
        x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    else:
        raise SystemExit(f"unknown case {case!r}")
    return model.train(), x, y
