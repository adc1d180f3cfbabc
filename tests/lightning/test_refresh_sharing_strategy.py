"""The ``ddp_lowrank`` strategy marks its optimizers' gradients identical across ranks, so
``refresh_sharing: auto`` shares their refreshes: two target weights, one per rank, each rank
refreshing only its own, and the ranks end with the same projectors."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lit_lowrank import LowRankOptimizer
from lit_lowrank.lightning.strategy import DDPLowRankStrategy
from lit_lowrank.projectors.base import Projector


class TwoTargets(pl.LightningModule):
    """An ordinary user module with two target weights of different costs."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(10, 12)
        self.hidden = torch.nn.Linear(12, 6)
        self.head = torch.nn.Linear(6, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        hidden = torch.relu(self.hidden(torch.relu(self.encoder(x))))
        return torch.nn.functional.cross_entropy(self.head(hidden), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class CountRefreshes(pl.Callback):
    """In every process: count ``Projector.refresh`` calls during training, then check them."""

    def on_train_start(self, trainer, pl_module):
        self.calls, self.original = 0, Projector.refresh

        def counted(projector, grad):
            self.calls += 1
            self.original(projector, grad)

        Projector.refresh = counted

    def on_train_end(self, trainer, pl_module):
        Projector.refresh = self.original
        optimizer = trainer.optimizers[0]
        assert isinstance(optimizer, LowRankOptimizer) and optimizer.gradients_identical
        assert optimizer.refresh_count == 2 * 2  # two targets, steps 0 and 2 with update_gap 2
        assert self.calls == 2, self.calls  # one target's two refreshes: the other rank made the others
        for projector in optimizer.projectors.values():
            basis = next(b for b in projector.bases() if b is not None)
            gathered = trainer.strategy.all_gather(basis.contiguous())
            assert torch.equal(gathered[0], gathered[1]), "ranks hold different projectors"


@pytest.mark.slow
def test_ddp_lowrank_shares_the_refreshes_between_the_ranks():
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 10, generator=g), torch.randint(0, 2, (32,), generator=g))
    strategy = DDPLowRankStrategy(targets=["encoder", "hidden"], rank=2, update_gap=2,
                                  ddp_kwargs={"start_method": "spawn", "process_group_backend": "gloo"})
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_steps=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[CountRefreshes()])
    trainer.fit(TwoTargets(), DataLoader(data, batch_size=4))  # the callback's failures propagate from the workers
