"""The ``nonfinite`` option through Lightning: a step with a NaN gradient is skipped and
counted in ``optim/skipped_steps``, or raises."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lit_lowrank.lightning import LowRankConfig, LowRankModule


class PoisonGradient(pl.Callback):
    """Puts a NaN into one projected weight's gradient before optimizer step ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.at:
            pl_module.network.model.layers[0].mlp.up_proj.weight.grad[0, 0] = float("nan")


def _fit(small_llama, nonfinite):
    torch.manual_seed(0)
    module = LowRankModule(small_llama(), lowrank=LowRankConfig(rank=4, update_gap=2, lr=0.01, warmup=1,
                                                                nonfinite=nonfinite))
    data = torch.randint(0, 64, (32, 17), generator=torch.Generator().manual_seed(0))
    trainer = pl.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1, callbacks=[PoisonGradient(2)])
    trainer.fit(module, DataLoader(data, batch_size=8))
    return module, trainer


def test_skipped_step_is_logged_and_the_weights_stay_finite(small_llama):
    with pytest.warns(RuntimeWarning, match="non-finite gradient in model.layers.0.mlp.up_proj.weight"):
        module, trainer = _fit(small_llama, "skip")
    assert trainer.callback_metrics["optim/skipped_steps"].item() == 1
    assert trainer.optimizers[0].skipped_steps == 1
    assert all(bool(p.isfinite().all()) for p in module.parameters())


def test_raise_stops_training_naming_the_weight(small_llama):
    with pytest.raises(FloatingPointError, match="model.layers.0.mlp.up_proj.weight"):
        _fit(small_llama, "raise")
