"""The strategies: reachable by name from Lightning's registry, and DDP training with them."""

from __future__ import annotations

import pytest

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lit_lowrank import LowRankOptimizer
from lit_lowrank.lightning import DDPLowRankStrategy, LowRankStrategy


def test_lowrank_by_name():
    trainer = pl.Trainer(strategy="lowrank", accelerator="cpu", logger=False)
    assert type(trainer.strategy) is LowRankStrategy
    assert trainer.strategy.root_device.type == "cpu"


def test_ddp_lowrank_by_name():
    trainer = pl.Trainer(strategy="ddp_lowrank", accelerator="cpu", devices=2, logger=False)
    assert type(trainer.strategy) is DDPLowRankStrategy
    assert trainer.strategy.num_processes == 2


class TwoLayer(pl.LightningModule):
    """An ordinary user module: its own Adam, no knowledge of lit_lowrank."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(10, 12)
        self.head = torch.nn.Linear(12, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.head(torch.relu(self.encoder(x))), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class CheckRanksAgree(pl.Callback):
    """Runs in every DDP process: the optimizer is low-rank and all ranks hold the same basis."""

    def on_train_end(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        assert isinstance(optimizer, LowRankOptimizer), type(optimizer)
        (projector,) = optimizer.projectors.values()
        basis = next(b for b in projector.bases() if b is not None)
        gathered = trainer.strategy.all_gather(basis)
        assert torch.equal(gathered[0], gathered[1]), "ranks hold different projectors"
        assert optimizer.refresh_count == 2  # steps 0 and 2 with update_gap 2


@pytest.mark.slow
def test_ddp_lowrank_trains_two_processes_with_identical_projectors():
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 10, generator=g), torch.randint(0, 2, (32,), generator=g))
    strategy = DDPLowRankStrategy(targets=["encoder"], rank=2, update_gap=2,
                                  ddp_kwargs={"start_method": "spawn", "process_group_backend": "gloo"})
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_steps=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[CheckRanksAgree()])
    model = TwoLayer()
    before = model.encoder.weight.detach().clone()
    trainer.fit(model, DataLoader(data, batch_size=4))  # CheckRanksAgree's failures propagate from the workers
    assert not torch.equal(model.encoder.weight, before)  # rank 0's trained weights came back

