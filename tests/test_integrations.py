"""The Hugging Face Trainer subclass runs AG-3 and SAM on a tiny random BERT."""

from __future__ import annotations

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def _tiny_bert():
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


class _Synthetic(torch.utils.data.Dataset):
    """Label = whether token 5 appears in the sequence: learnable by a tiny model."""

    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(6, 64, (n, 12), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        self.ids[self.labels == 1, 3] = 5

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": self.labels[i]}


@pytest.mark.parametrize("method,d", [("ag3", 3), ("ag3", 1), ("sam", 1)])
def test_trainer_subclass_lowers_the_loss(tmp_path, method, d):
    from ttadapt.integrations import AveragedGradientTrainer

    model = _tiny_bert()
    data = _Synthetic()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, num_train_epochs=15,
                                          learning_rate=5e-3, logging_steps=1, report_to=[], save_strategy="no",
                                          use_cpu=True, seed=0, disable_tqdm=True)
    trainer = AveragedGradientTrainer(model=model, args=args, train_dataset=data, ag_method=method, ag_d=d)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 60
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    if method == "ag3":
        assert len(trainer.anchors.indices()) <= (1 if d == 1 else 2)


def test_trainer_subclass_rejects_bad_options(tmp_path):
    from ttadapt.integrations import AveragedGradientTrainer

    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="ag_method"):
        AveragedGradientTrainer(model=_tiny_bert(), args=args, ag_method="ag1")
    with pytest.raises(ValueError, match="ag_d"):
        AveragedGradientTrainer(model=_tiny_bert(), args=args, ag_d=0)
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    flag = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"  # (transformers 5 renamed it)
    checkpointed = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **{flag: True})
    with pytest.raises(ValueError, match="checkpointing"):
        AveragedGradientTrainer(model=_tiny_bert(), args=checkpointed)
