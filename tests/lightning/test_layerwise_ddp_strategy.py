"""Layer-wise updates with several processes under Lightning: ``strategy="ddp_lowrank"`` leaves
the model unwrapped and the hooks all-reduce each gradient; a LowRankModule (the YAML path)
trains the weights that standard DDP trains, with gradient accumulation, on every rank alike."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from lit_lowrank.lightning import DDPLowRankStrategy, LowRankConfig, LowRankModule
from lit_lowrank.lightning.layerwise import LayerwiseCallback
from test_communication_callback import SPAWN_GLOO
from test_layerwise_callback import tokens, trainer


class RanksAgree(pl.Callback):
    def on_train_end(self, trainer, pl_module):
        for p in pl_module.parameters():
            gathered = trainer.strategy.all_gather(p.detach())
            assert torch.equal(gathered[0], gathered[1]), "ranks hold different weights"


def _fit(small_llama, strategy: pl.strategies.Strategy, **config):
    torch.manual_seed(0)
    lowrank = LowRankConfig(rank=4, update_gap=2, lr=0.01, weight_decay=0.1, warmup=1, **config)
    module = LowRankModule(small_llama(), lowrank=lowrank)
    t = trainer(strategy=strategy, devices=2, max_epochs=1, accumulate_grad_batches=2, callbacks=[RanksAgree()])
    t.fit(module, DataLoader(tokens(20), batch_size=2))  # 5 batches per rank: 3 optimizer steps
    return module, t.callback_metrics


def test_layerwise_ddp_lowrank_module_matches_standard_ddp(small_llama):
    standard, _ = _fit(small_llama, DDPStrategy(**SPAWN_GLOO))
    layerwise, metrics = _fit(small_llama, DDPLowRankStrategy(ddp_kwargs=SPAWN_GLOO), layerwise=True,
                              communication="lowrank")
    for ours, theirs in zip(layerwise.parameters(), standard.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert metrics["optim/comm_bytes"].item() > 0


def test_layerwise_refuses_plain_ddp(small_llama):
    module = LowRankModule(small_llama(), lowrank=LowRankConfig(rank=4, layerwise=True))
    with pytest.raises(ValueError, match="strategy='ddp_lowrank'"):
        LayerwiseCallback().setup(trainer(strategy="ddp", devices=2), module, "fit")


def test_ddp_lowrank_refuses_options_beside_a_lowrank_module(small_llama):
    module = LowRankModule(small_llama(), lowrank=LowRankConfig(rank=4))
    with pytest.raises(ValueError, match="its own lowrank section"):
        DDPLowRankStrategy(rank=8).connect(module)


class DetachOnRankOne(pl.Callback):
    """From the second batch on, rank 1's second MLP gets no gradient (its output is detached)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1 and batch_idx == 1:
            pl_module.network.model.layers[1].mlp.register_forward_hook(lambda module, args, out: out.detach())


@pytest.mark.slow
def test_layerwise_ddp_names_a_parameter_unused_on_one_rank(small_llama):
    torch.manual_seed(0)
    module = LowRankModule(small_llama(), lowrank=LowRankConfig(rank=4, update_gap=2, lr=0.01, layerwise=True))
    t = trainer(strategy=DDPLowRankStrategy(ddp_kwargs=SPAWN_GLOO), devices=2, max_epochs=1,
                callbacks=[DetachOnRankOne()])
    with pytest.raises(Exception, match=r"some ranks but not on others: .*layers\.1\.mlp\.gate_proj"):
        t.fit(module, DataLoader(tokens(8), batch_size=2))
