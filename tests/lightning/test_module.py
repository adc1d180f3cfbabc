"""LowRankModule end to end on tiny in-memory data: the optimizer built from the config, the
LR schedule, telemetry and validation metrics in the logged values."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy
from transformers import BertConfig, BertForSequenceClassification

from lit_lowrank import LowRankOptimizer
from lit_lowrank.lightning import LowRankConfig, LowRankModule, SequenceClassification


def trainer(**kwargs) -> pl.Trainer:
    options = dict(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu", devices=1)
    options.update(kwargs)
    return pl.Trainer(**options)


def tokens(n: int = 48, length: int = 17, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
def test_lowrank_fit_logs_telemetry_and_perplexity(small_llama):
    torch.manual_seed(0)
    config = LowRankConfig(rank=4, update_gap=3, lr=0.01, warmup=2)
    module = LowRankModule(small_llama(), lowrank=config)
    data = tokens()
    t = trainer(limit_val_batches=2)
    t.fit(module, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    optimizer = t.optimizers[0]
    assert isinstance(optimizer, LowRankOptimizer)
    logged = t.callback_metrics
    # 14 projected weights (2 layers × 7 linears), refreshed at steps 0 and 3 of 6
    assert logged["optim/refreshes"].item() == 14 * 2
    per_layer = {k: v.item() for k, v in logged.items() if k.startswith("optim/layers/")}
    assert len(per_layer) == 14 * 2
    assert per_layer["optim/layers/model.layers.1.mlp.down_proj.weight/refreshes"] == 2
    assert all(v == 4 for k, v in per_layer.items() if k.endswith("/rank"))
    sizes = optimizer.state_bytes()
    assert logged["optim/state_bytes"].item() == sum(sizes.values())
    assert logged["optim/projectors_bytes"].item() == sizes["projectors"] > 0
    # the last logged lr is the one step 5 (0-based) used: cosine from step 2 to 6, 3/4 of the way
    assert logged["train/lr"].item() == pytest.approx(0.01 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 4))),
                                                      rel=1e-5)
    assert logged["val/ppl"].item() == pytest.approx(torch.exp(logged["val/loss"]).item(), rel=1e-5)


@pytest.mark.slow
def test_disabled_is_plain_adamw_with_comparable_state_bytes(small_llama):
    module = LowRankModule(small_llama(), lowrank=LowRankConfig(enabled=False, lr=1e-3))
    t = trainer(max_steps=2)
    t.fit(module, DataLoader(tokens(), batch_size=8))
    optimizer = t.optimizers[0]
    assert type(optimizer) is torch.optim.AdamW
    n_params = sum(p.numel() for p in module.parameters())
    assert t.callback_metrics["optim/dense_bytes"].item() == 2 * 4 * n_params  # exp_avg + exp_avg_sq fp32
    assert "optim/refreshes" not in t.callback_metrics


@pytest.mark.slow
def test_sequence_classification_logs_metrics_per_named_loader():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=37, num_labels=3)
    network = BertForSequenceClassification(config)
    task = SequenceClassification(3, metrics=MulticlassAccuracy(3, average="micro"))
    module = LowRankModule(network, task, LowRankConfig(rank=4, targets=["attention", "intermediate", "output"]))
    rows = [{"input_ids": torch.randint(0, 40, (6,)), "labels": torch.tensor(i % 3)} for i in range(16)]

    class Data(pl.LightningDataModule):
        val_names = ["matched", "mismatched"]

        def train_dataloader(self):
            return DataLoader(rows, batch_size=4)

        def val_dataloader(self):
            return [DataLoader(rows, batch_size=4), DataLoader(rows[:8], batch_size=4)]

    t = trainer(max_steps=2, val_check_interval=2)
    t.fit(module, datamodule=Data())
    logged = t.callback_metrics
    for name in ("matched", "mismatched"):
        assert 0.0 <= logged[f"val_{name}/MulticlassAccuracy"].item() <= 1.0
        assert logged[f"val_{name}/loss"].item() > 0
    assert isinstance(t.optimizers[0], LowRankOptimizer)


@pytest.mark.slow
def test_infinite_run_is_rejected(small_llama):
    module = LowRankModule(small_llama())
    with pytest.raises(ValueError, match="max_steps"):
        trainer(max_steps=-1, max_epochs=-1).fit(module, DataLoader(tokens(), batch_size=8))
