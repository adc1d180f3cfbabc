"""Layers unfrozen during training by Lightning's ``BaseFinetuning`` (``add_param_group``) are
projected like the others, with the config's betas and weight decay."""

from __future__ import annotations

import pytest

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BaseFinetuning
from torch.utils.data import DataLoader

from lit_lowrank.lightning import LowRankConfig, LowRankModule


class UnfreezeSecondLayer(BaseFinetuning):
    def freeze_before_training(self, pl_module):
        self.freeze(pl_module.network.model.layers[1])

    def finetune_function(self, pl_module, current_epoch, optimizer):
        if current_epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.network.model.layers[1], optimizer)


@pytest.mark.slow
def test_layers_unfrozen_by_base_finetuning_are_projected(small_llama):
    torch.manual_seed(0)
    config = LowRankConfig(rank=4, update_gap=3, lr=0.01, warmup=1, betas=(0.8, 0.95), weight_decay=0.05)
    module = LowRankModule(small_llama(), lowrank=config)
    layer = module.network.model.layers[1]
    data = torch.randint(0, 64, (32, 17), generator=torch.Generator().manual_seed(0))
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1, callbacks=[UnfreezeSecondLayer()])
    trainer.fit(module, DataLoader(data, batch_size=8))
    optimizer = trainer.optimizers[0]
    linears = [m.weight for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    added = optimizer.param_groups[2:]
    assert [g["lowrank"] for g in added] == [True, False]
    assert added[0]["params"] == linears  # the 7 attention and MLP weights
    assert all(g["betas"] == (0.8, 0.95) and g["weight_decay"] == 0.05 for g in added)
    for weight in linears:
        assert weight in optimizer.projectors
        moment = optimizer.state[weight]["exp_avg"]
        assert 4 in moment.shape and moment.numel() < weight.numel()  # projected at rank 4
