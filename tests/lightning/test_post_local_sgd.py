"""Post-local SGD (Lightning's ``model_averaging_period`` with ``PostLocalSGDState``) over a converted
optimizer: both adoption paths (``ddp_lowrank``, and ``LowRankCallback`` under Lightning's ``DDPStrategy``)
step the LowRankOptimizer, and Lightning's periodic model averager averages the weights it steps."""

from __future__ import annotations

import pytest

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks import post_localSGD_hook
from torch.utils.data import DataLoader, TensorDataset

from lit_lowrank import LowRankOptimizer
from lit_lowrank.lightning import DDPLowRankStrategy, LowRankCallback
from tests.lightning.test_strategy import TwoLayer

PERIOD, WARMUP = 2, 1  # PeriodicModelAverager averages at its calls WARMUP, WARMUP + PERIOD, ...
OFFSET = 0.01  # rank r shifts encoder.weight by r * OFFSET before each step, so ranks differ until averaged


def averaging_kwargs() -> dict:
    state = post_localSGD_hook.PostLocalSGDState(process_group=None, subgroup=None, start_localSGD_iter=WARMUP)
    return dict(start_method="spawn", process_group_backend="gloo", ddp_comm_state=state,
                ddp_comm_hook=post_localSGD_hook.post_localSGD_hook, model_averaging_period=PERIOD)


class CheckAveraging(pl.Callback):
    """In every process: the LowRankOptimizer is stepped, and the ranks' weights agree exactly after
    the steps the averager averages at and differ after the others (their rank-dependent shift)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with torch.no_grad():
            pl_module.encoder.weight.add_(trainer.global_rank * OFFSET)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        optimizer = trainer.optimizers[0]
        assert isinstance(optimizer, LowRankOptimizer), type(optimizer)
        assert optimizer.state, "the LowRankOptimizer was not stepped"
        gathered = trainer.strategy.all_gather(pl_module.encoder.weight.detach())
        averager_call = trainer.global_step - 1
        averaged = averager_call >= WARMUP and (averager_call - WARMUP) % PERIOD == 0
        assert torch.equal(gathered[0], gathered[1]) == averaged, (trainer.global_step, averaged)


ADOPTIONS = {
    "ddp_lowrank": lambda: dict(strategy=DDPLowRankStrategy(targets=["encoder"], rank=2, update_gap=2,
                                                            ddp_kwargs=averaging_kwargs())),
    "callback": lambda: dict(strategy=DDPStrategy(**averaging_kwargs()),
                             callbacks=[LowRankCallback(targets=["encoder"], rank=2, update_gap=2)]),
}


@pytest.mark.slow
@pytest.mark.parametrize("adoption", sorted(ADOPTIONS))
def test_post_local_sgd_averages_the_converted_optimizers_weights(adoption):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 10, generator=g), torch.randint(0, 2, (32,), generator=g))
    kwargs = ADOPTIONS[adoption]()
    callbacks = kwargs.pop("callbacks", []) + [CheckAveraging()]
    trainer = pl.Trainer(accelerator="cpu", devices=2, max_steps=5, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kwargs)
    trainer.fit(TwoLayer(), DataLoader(data, batch_size=4))  # CheckAveraging's failures propagate from the workers


def test_lowrank_communication_refuses_the_post_local_sgd_hook():
    """``communication: lowrank`` registers its own comm hook: beside post-local SGD's it is refused at setup."""
    from lit_lowrank.lightning.communication import LowRankCommunicationCallback

    strategy = DDPLowRankStrategy(ddp_kwargs=averaging_kwargs())
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match="ddp_comm_hook set: use one of them"):
        LowRankCommunicationCallback().setup(trainer, TwoLayer(), "fit")
