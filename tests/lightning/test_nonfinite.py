"""The ``nonfinite`` option through Lightning: a step with a NaN gradient is skipped and
counted in ``optim/skipped_steps``, or raises; a run whose steps keep being skipped
(``max_consecutive_skips``) or whose weights became non-finite stops with an error naming it."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lit_lowrank.lightning import LowRankConfig, LowRankModule


class PoisonGradient(pl.Callback):
    """Puts a NaN into one projected weight's gradient before optimizer step ``at`` (and every
    later one, with ``onwards``)."""

    def __init__(self, at: int, onwards: bool = False) -> None:
        self.at, self.onwards = at, onwards
        self.poisoned = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.at or (self.onwards and trainer.global_step > self.at):
            pl_module.network.model.layers[0].mlp.up_proj.weight.grad[0, 0] = float("nan")
            self.poisoned += 1


class CorruptWeight(pl.Callback):
    """Puts a NaN into one projected weight before training batch ``at`` (an fp16 overflow, a
    faulty plugin update or a corrupted checkpoint would)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.at:
            with torch.no_grad():
                pl_module.network.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")


def _fit(small_llama, nonfinite, callback=None, max_steps=4, **options):
    torch.manual_seed(0)
    module = LowRankModule(small_llama(), lowrank=LowRankConfig(rank=4, update_gap=2, lr=0.01, warmup=1,
                                                                nonfinite=nonfinite, **options))
    data = torch.randint(0, 64, (8 * max_steps, 17), generator=torch.Generator().manual_seed(0))
    trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1,
                         callbacks=[callback or PoisonGradient(2)])
    trainer.fit(module, DataLoader(data, batch_size=8))
    return module, trainer


@pytest.mark.slow
def test_skipped_step_is_logged_and_the_weights_stay_finite(small_llama):
    with pytest.warns(RuntimeWarning, match="non-finite gradient in model.layers.0.mlp.up_proj.weight"):
        module, trainer = _fit(small_llama, "skip")
    assert trainer.callback_metrics["optim/skipped_steps"].item() == 1
    assert trainer.optimizers[0].skipped_steps == 1
    assert all(bool(p.isfinite().all()) for p in module.parameters())


@pytest.mark.slow
def test_raise_stops_training_naming_the_weight(small_llama):
    with pytest.raises(FloatingPointError, match="model.layers.0.mlp.up_proj.weight"):
        _fit(small_llama, "raise")


@pytest.mark.slow
def test_a_run_that_keeps_skipping_stops_after_max_consecutive_skips(small_llama):
    poison = PoisonGradient(1, onwards=True)
    with pytest.warns(RuntimeWarning, match="step skipped"):
        with pytest.raises(FloatingPointError, match="model.layers.0.mlp.up_proj.weight: its update was skipped 4 "
                                                     "times in a row, more than max_consecutive_skips=3"):
            _fit(small_llama, "skip", callback=poison, max_steps=10, max_consecutive_skips=3)
    assert poison.poisoned == 4  # steps 1, 2, 3 skipped, step 4 raised: the run did not reach its end


@pytest.mark.slow
def test_a_nonfinite_weight_stops_the_run_naming_it(small_llama):
    with pytest.raises(FloatingPointError, match=r"weight model.layers.1.mlp.up_proj.weight is non-finite \(not "
                                                 r"its gradient\): the model is corrupted"):
        _fit(small_llama, "skip", callback=CorruptWeight(2))


def test_max_consecutive_skips_reaches_every_group_and_is_checked_with_the_config(small_llama):
    optimizer = LowRankConfig(rank=4, max_consecutive_skips=7).build(small_llama())
    assert {group["max_consecutive_skips"] for group in optimizer.param_groups} == {7}
    assert LowRankConfig(rank=4).build(small_llama()).defaults["max_consecutive_skips"] == 25
    assert {group["max_consecutive_skips"] for group in
            LowRankConfig(rank=4, max_consecutive_skips=None).build(small_llama()).param_groups} == {None}
    with pytest.raises(ValueError, match="max_consecutive_skips must be >= 1 or None, got 0"):
        LowRankConfig(max_consecutive_skips=0)
