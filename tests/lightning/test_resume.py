"""Checkpoint/resume: a run interrupted after k steps and resumed with ``fit(ckpt_path=...)``
logs exactly the losses of an uninterrupted run — the projectors, moments, refresh schedule,
LR schedule and the litdata stream position all come back."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lit_lowrank.data import PretrainData
from lit_lowrank.data.pretrain import prepare_embedded
from lit_lowrank.lightning import LowRankConfig, LowRankModule

VOCAB = 512


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "lit_lowrank_cache"
    prepare_embedded(path, VOCAB)  # shared by the data tests: made once per session
    return path


class RecordLosses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.lrs: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


class Interrupt(Callback):
    """Stops the run after ``step`` optimizer steps, as a crash or preemption would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def run(small_llama, cache_dir, max_steps, ckpt_path=None, callbacks=()):
    pl.seed_everything(0)
    module = LowRankModule(small_llama(VOCAB), lowrank=LowRankConfig(rank=4, update_gap=3, lr=0.01, warmup=2))
    data = PretrainData(seq_len=32, batch_size=4, vocab_size=VOCAB, cache_dir=str(cache_dir))
    recorder = RecordLosses()
    trainer = pl.Trainer(max_steps=max_steps, limit_val_batches=0, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", callbacks=[recorder, *callbacks],
                         enable_checkpointing=bool(callbacks))
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return recorder, trainer


@pytest.mark.slow
def test_interrupted_and_resumed_run_logs_the_same_losses(small_llama, cache_dir, tmp_path):
    full, full_trainer = run(small_llama, cache_dir, max_steps=8)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    first, _ = run(small_llama, cache_dir, max_steps=8, callbacks=[checkpoint, Interrupt(4)])
    assert len(first.losses) == 4
    (ckpt,) = tmp_path.glob("*step=4.ckpt")
    second, resumed_trainer = run(small_llama, cache_dir, max_steps=8, ckpt_path=str(ckpt))
    assert len(second.losses) == 4
    torch.testing.assert_close(first.losses + second.losses, full.losses, rtol=0, atol=0)
    assert first.lrs + second.lrs == pytest.approx(full.lrs)
    assert resumed_trainer.optimizers[0].refresh_count == full_trainer.optimizers[0].refresh_count
