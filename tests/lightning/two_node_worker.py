"""One "node" of a two-node Lightning run on this machine (see test_multinode.py): started with
NODE_RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set, as torchrun or SLURM would on each node."""

import os
import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lit_lowrank.lightning import DDPLowRankStrategy
from test_strategy import TwoLayer


class Record(pl.Callback):
    def on_train_end(self, trainer, pl_module):
        torch.save({"global_rank": trainer.global_rank, "node_rank": trainer.node_rank,
                    "world_size": trainer.world_size, "comm_bytes": trainer.callback_metrics["optim/comm_bytes"],
                    "params": [p.detach() for p in pl_module.parameters()]},
                   os.path.join(sys.argv[1], f"node{trainer.node_rank}.pt"))


if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 10, generator=g), torch.randint(0, 2, (32,), generator=g))
    strategy = DDPLowRankStrategy(targets=["encoder"], rank=2, update_gap=2, communication="lowrank",
                                  ddp_kwargs={"process_group_backend": "gloo"})
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, num_nodes=2, max_steps=4, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Record()])
    torch.manual_seed(0)
    trainer.fit(TwoLayer(), DataLoader(data, batch_size=4))
