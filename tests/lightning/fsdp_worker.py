"""One rank of a two-process FSDP2 run under Lightning on this machine (see test_fsdp.py),
started with LOCAL_RANK, MASTER_ADDR and MASTER_PORT set, as torchrun would start it.

``python fsdp_worker.py OUT MODULE CHECKPOINT``: MODULE is ``lowrank`` (a LowRankModule, strategy
``fsdp_lowrank``) or ``user`` (an ordinary module that shards itself in ``configure_model``,
Lightning's ModelParallelStrategy and LowRankCallback); CHECKPOINT is ``distributed`` or ``full``.
Trains two epochs of 3 steps (2 accumulated micro-batches each) with a checkpoint after the first (a plain DataLoader resumes at an
epoch boundary), then resumes a fresh run from it; rank 0 saves both runs' final weights (whole)
and every rank its optimizer-state bytes.
"""

import os
import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, Subset, TensorDataset

from lit_lowrank.lightning import FSDPLowRankStrategy, LowRankCallback, LowRankConfig, LowRankModule
from lit_lowrank.models import Llama

SMALL = dict(hidden_size=32, intermediate_size=64, num_heads=2, num_layers=2)
EPOCHS, STEPS, BATCH, ACCUMULATE = 2, 3, 1, 2  # optimizer steps per epoch, micro-batch per rank, micro-batches per step
SAMPLES = 2 * BATCH * ACCUMULATE * STEPS  # two ranks; one process takes micro-batches of 2 · BATCH


def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (SAMPLES, 13), generator=torch.Generator().manual_seed(0))


def lowrank_module() -> LowRankModule:
    torch.manual_seed(0)
    config = LowRankConfig(rank=4, update_gap=2, lr=0.01, weight_decay=0.1, warmup=1)
    return LowRankModule(Llama("tiny", vocab_size=64, **SMALL), lowrank=config)


class UserModule(pl.LightningModule):
    """An ordinary module: its own AdamW, sharding itself with fully_shard as Lightning's docs show."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Tanh())
                                          for _ in range(2))
        self.head = torch.nn.Linear(10, 3)

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        for block in self.blocks:
            fully_shard(block, mesh=self.device_mesh["data_parallel"])
        fully_shard(self, mesh=self.device_mesh["data_parallel"])

    def forward(self, x):  # the root's forward: fully_shard gathers the head's rows around it
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


def user_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(SAMPLES, 10, generator=g), torch.randint(0, 3, (SAMPLES,), generator=g))


class Record(pl.Callback):
    def __init__(self, name: str) -> None:
        self.name = name

    def on_train_end(self, trainer, pl_module):
        weights = [p.full_tensor().detach() for p in pl_module.parameters()]  # every rank joins the gathers
        state = {**trainer.optimizers[0].state_bytes(), "comm_bytes": trainer.callback_metrics["optim/comm_bytes"].item()}
        torch.save(state, os.path.join(OUT, f"{self.name}-state-rank{trainer.global_rank}.pt"))
        if trainer.global_rank == 0:
            torch.save(weights, os.path.join(OUT, f"{self.name}.pt"))


def fit(name: str, ckpt_path: str | None = None) -> None:
    distributed = CHECKPOINT == "distributed"
    if MODULE == "lowrank":
        module, data = lowrank_module(), tokens()
        strategy = FSDPLowRankStrategy(process_group_backend="gloo", save_distributed_checkpoint=distributed)
        callbacks = []
    else:
        module, data = UserModule(), user_data()
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo",
                                         save_distributed_checkpoint=distributed)
        callbacks = [LowRankCallback(targets=["blocks"], rank=3, update_gap=2)]
    checkpoints = ModelCheckpoint(dirpath=os.path.join(OUT, "ckpt"), save_top_k=-1)  # after each epoch
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_epochs=EPOCHS, logger=False,
                         accumulate_grad_batches=ACCUMULATE,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, use_distributed_sampler=False, callbacks=[*callbacks, checkpoints, Record(name)])
    rank = int(os.environ["LOCAL_RANK"])  # samples rank, rank + 2, ...: the two ranks' batches k make batch k of one process
    trainer.fit(module, DataLoader(Subset(data, range(rank, len(data), 2)), batch_size=BATCH), ckpt_path=ckpt_path)


if __name__ == "__main__":
    OUT, MODULE, CHECKPOINT = sys.argv[1:4]
    fit("uninterrupted")
    saved = os.path.join(OUT, "ckpt", f"epoch=0-step={STEPS}.ckpt")
    fit("resumed", ckpt_path=saved)
