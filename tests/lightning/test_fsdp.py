"""FSDP2 under Lightning (two gloo processes on this machine, started as torchrun starts them):
``strategy="fsdp_lowrank"`` with a LowRankModule, and an ordinary module that shards itself under
``ModelParallelStrategy`` with LowRankCallback, both with gradient accumulation. Both resume
exactly from distributed and full checkpoints; the LowRankModule run trains what one process
trains on the whole batch, with its optimizer state split over the ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lit_lowrank.lightning import LowRankCallback, LowRankConfig, LowRankModule
from lit_lowrank.lightning.refusals import check_strategy
from ranks import free_port, requires_gloo

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import fsdp_worker  # noqa: E402


def run_two_ranks(out: Path, module: str, checkpoint: str) -> None:
    port, ranks = free_port(), []
    for local_rank in (0, 1):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "LOCAL_RANK": str(local_rank),
               "NODE_RANK": "0", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent.parent), os.environ.get("PYTHONPATH", "")])}
        ranks.append(subprocess.Popen([sys.executable, str(HERE / "fsdp_worker.py"), str(out), module, checkpoint],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for rank in ranks:
        output, _ = rank.communicate(timeout=600)
        assert rank.returncode == 0, output[-4000:]


@pytest.mark.slow
@requires_gloo
@pytest.mark.parametrize("checkpoint", ["distributed", "full"])
def test_fsdp_lowrank_module_resumes_exactly_and_matches_one_process(tmp_path, checkpoint):
    run_two_ranks(tmp_path, "lowrank", checkpoint)
    uninterrupted, resumed = (torch.load(tmp_path / f"{name}.pt") for name in ("uninterrupted", "resumed"))
    for a, b in zip(uninterrupted, resumed):
        assert torch.equal(a, b)
    module = fsdp_worker.lowrank_module()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=fsdp_worker.EPOCHS, logger=False,
                         accumulate_grad_batches=fsdp_worker.ACCUMULATE,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0)
    trainer.fit(module, DataLoader(fsdp_worker.tokens(), batch_size=2 * fsdp_worker.BATCH))
    for ours, single in zip(uninterrupted, module.parameters()):
        torch.testing.assert_close(ours, single.detach(), rtol=1e-4, atol=1e-6)
    shares = [torch.load(tmp_path / f"uninterrupted-state-rank{r}.pt") for r in (0, 1)]
    whole = trainer.optimizers[0].state_bytes()
    for role in ("moments", "dense"):  # split over the ranks, not copied
        assert shares[0][role] + shares[1][role] == whole[role] and 0 < shares[1][role] < whole[role]
    ff, rank = 64, 4  # each down_proj (32×64) is projected on the left: R and N, 4·64 numbers each
    assert shares[0]["comm_bytes"] == 2 * (2 * rank * ff * 4) + 8  # the last step does not refresh; + the NaN check


@pytest.mark.slow
@requires_gloo
def test_a_module_that_shards_itself_adopts_lowrank_with_the_callback(tmp_path):
    run_two_ranks(tmp_path, "user", "distributed")
    uninterrupted, resumed = (torch.load(tmp_path / f"{name}.pt") for name in ("uninterrupted", "resumed"))
    for a, b in zip(uninterrupted, resumed):
        assert torch.equal(a, b)
    shares = [torch.load(tmp_path / f"uninterrupted-state-rank{r}.pt") for r in (0, 1)]
    assert shares[0]["moments"] > 0 and shares[1]["moments"] > 0


def test_fsdp1_and_what_needs_whole_weights_are_refused():
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    with pytest.raises(ValueError, match="FSDP1.*fsdp_lowrank"):  # (Lightning builds FSDPStrategy on GPUs only)
        check_strategy(FSDPStrategy(), LowRankConfig(rank=2))
    trainer = pl.Trainer(strategy=ModelParallelStrategy(), accelerator="cpu", devices=2, logger=False)
    with pytest.raises(ValueError, match=r"\['layerwise', 'communication: lowrank'\] cannot be combined with sharded"):
        LowRankCallback(rank=2, layerwise=True, communication="lowrank").setup(trainer, fsdp_worker.UserModule(), "fit")
    module = LowRankModule(fsdp_worker.lowrank_module().network, lowrank=LowRankConfig(method="compact", rank=4))
    module.trainer = trainer
    with pytest.raises(ValueError, match=r"\['compact'\] cannot be combined"):
        module.setup("fit")


def test_fsdp_lowrank_by_name_puts_every_process_in_one_data_parallel_mesh():
    from lit_lowrank.lightning import FSDPLowRankStrategy

    trainer = pl.Trainer(strategy="fsdp_lowrank", accelerator="cpu", devices=2, logger=False)
    assert type(trainer.strategy) is FSDPLowRankStrategy
    assert trainer.strategy._tensor_parallel_size == 1 and trainer.strategy.num_processes == 2
