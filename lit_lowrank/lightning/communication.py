"""``LowRankCommunicationCallback``: ``communication: lowrank`` under Lightning's DDP strategies —
the DDP-wrapped model all-reduces ``R = PᵀG`` of target weights between subspace refreshes
(:mod:`lit_lowrank.optim.communication`)."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lit_lowrank.lightning.gradient_readers import refuse_gradient_readers
from lit_lowrank.optim.communication import LowRankCommunication, lowrank_comm_hook
from lit_lowrank.optim.lowrank import LowRankOptimizer


class LowRankCommunicationCallback(Callback):
    """Register :func:`~lit_lowrank.optim.communication.lowrank_comm_hook` on the DDP model once
    the strategy wrapped it and built the optimizer (``on_fit_start``).

    ``LowRankModule``, :class:`~lit_lowrank.lightning.LowRankCallback` and ``ddp_lowrank`` add
    it for ``communication: lowrank`` (without ``layerwise``, which reduces gradients itself).

    Raises (at setup, naming the fix):
        ValueError: without a DDP strategy; with ``gradient_clip_val`` or fp16 gradient scaling
            (both need the full averaged gradient of every weight, which is never formed); with
            a DDP communication hook of your own; at fit start, unless exactly one optimizer is
            a LowRankOptimizer.
    """

    def __init__(self) -> None:
        self.communication: LowRankCommunication | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        if not isinstance(strategy, DDPStrategy):
            raise ValueError(f"communication: lowrank all-reduces projected gradients through DDP, but the strategy "
                             f"is {type(strategy).__name__}: use strategy='ddp_lowrank' (or 'ddp'), or "
                             "communication: full")
        refuse_gradient_readers(
            trainer, feature="communication: lowrank", off="communication: full",
            clipping="the averaged full gradient of a target weight is never formed, so it cannot be clipped by its norm",
            scaling="the optimizer gets projected gradients that the fp16 scaler does not unscale")
        if getattr(strategy, "_ddp_comm_hook", None) is not None:
            raise ValueError("communication: lowrank registers its own DDP communication hook, and the strategy has "
                             "ddp_comm_hook set: use one of them")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = trainer.strategy.model
        optimizers = [o for o in trainer.optimizers if isinstance(o, LowRankOptimizer)]
        if len(optimizers) != 1:
            raise ValueError(f"communication: lowrank needs exactly one LowRankOptimizer, got "
                             f"{[type(o).__name__ for o in trainer.optimizers]}")
        if not isinstance(model, DistributedDataParallel):
            raise ValueError(f"communication: lowrank needs the model wrapped in DistributedDataParallel, got "
                             f"{type(model).__name__}")
        self.communication = LowRankCommunication(optimizers[0])
        model.register_comm_hook(self.communication, lowrank_comm_hook)
