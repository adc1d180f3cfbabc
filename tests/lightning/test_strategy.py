"""The strategies are reachable by name from Lightning's registry."""

from __future__ import annotations

import lightning.pytorch as pl

from lit_lowrank.lightning import DDPLowRankStrategy, LowRankStrategy


def test_lowrank_by_name():
    trainer = pl.Trainer(strategy="lowrank", accelerator="cpu", logger=False)
    assert type(trainer.strategy) is LowRankStrategy
    assert trainer.strategy.root_device.type == "cpu"


def test_ddp_lowrank_by_name():
    trainer = pl.Trainer(strategy="ddp_lowrank", accelerator="cpu", devices=2, logger=False)
    assert type(trainer.strategy) is DDPLowRankStrategy
    assert trainer.strategy.num_processes == 2
