"""``LayerwiseCallback``: layer-wise updates (:class:`~lit_lowrank.optim.layerwise.LayerwiseUpdates`)
under Lightning's automatic optimization, with ``accumulate_grad_batches`` honoured."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lit_lowrank.lightning.gradient_readers import refuse_gradient_readers
from lit_lowrank.optim.communication import COMMUNICATIONS
from lit_lowrank.optim.layerwise import LayerwiseUpdates
from lit_lowrank.optim.lowrank import LowRankOptimizer


class LayerwiseCallback(Callback):
    """Step each parameter inside ``backward()`` and free its gradient at once.

    ``LowRankModule``, :class:`~lit_lowrank.lightning.LowRankCallback` and the ``lowrank``
    strategy add it when their config says ``layerwise: true``. Lightning keeps driving the loop: it still calls
    ``optimizer.step(closure)``, which runs the closure (forward and backward — where the hooks
    update the weights) and then finds no gradient left, so it is a no-op; LR schedulers step once
    per optimizer step as usual. With ``accumulate_grad_batches = k`` the hooks step on the last
    micro-batch of each window — Lightning's own rule, so a window cut short at an epoch's end
    steps too — and low-rank weights accumulate only their projections in between.

    With several processes it needs ``strategy="ddp_lowrank"``, which leaves the model unwrapped
    so that the hooks all-reduce each gradient themselves (``communication``: ``lowrank`` sends
    ``R`` where the step takes it, ``full`` every gradient).

    Raises (at setup, naming the fix):
        ValueError: with ``gradient_clip_val`` (global norm clipping needs every gradient at
            once), with fp16 gradient scaling (the scaler unscales gradients after backward),
            with manual optimization, or with several processes under another strategy than
            ``ddp_lowrank`` (DDP would all-reduce gradients after the hooks ran).
        RuntimeError: from ``backward()`` on every rank, before that step updates anything, naming
            each parameter that got a gradient in the step on some ranks but not on others
            (:class:`~lit_lowrank.optim.layerwise.LayerwiseUpdates`: no ``find_unused_parameters``).
    """

    def __init__(self, communication: str = "full") -> None:
        if communication not in COMMUNICATIONS:
            raise ValueError(f"communication={communication!r}; expected one of {COMMUNICATIONS}")
        self.communication = communication
        self.updates: LayerwiseUpdates | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_gradient_readers(
            trainer, feature="layerwise: true", off="layerwise: false",
            clipping="each gradient is freed before the next one exists, so none can be clipped by the global norm",
            scaling="the updates run before the fp16 scaler could unscale the gradients")
        if not pl_module.automatic_optimization:
            raise ValueError("LayerwiseCallback drives Lightning's automatic optimization; with "
                             "automatic_optimization=False attach lit_lowrank.optim.layerwise.LayerwiseUpdates "
                             "to your optimizer yourself.")
        if trainer.world_size > 1 and getattr(trainer.strategy, "strategy_name", None) != "ddp_lowrank":
            raise ValueError(f"layer-wise updates with {trainer.world_size} processes reduce each gradient inside "
                             f"backward, which {type(trainer.strategy).__name__} would do again after it: use "
                             "strategy='ddp_lowrank' (with LowRankCallback's options on it), or layerwise: false.")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after the optimizers were built (and converted by LowRankCallback) and a checkpoint restored
        optimizers = [o for o in trainer.optimizers if isinstance(o, LowRankOptimizer)]
        if len(optimizers) != 1 or len(trainer.optimizers) != 1:
            kinds = [type(o).__name__ for o in trainer.optimizers]
            raise ValueError(f"layer-wise updates need exactly one optimizer, a LowRankOptimizer; got {kinds}. "
                             "Set lowrank.enabled: true (LowRankModule) or add LowRankCallback.")
        if isinstance(trainer.strategy.model, DistributedDataParallel):
            raise ValueError("layer-wise updates reduce gradients themselves, but the model is wrapped in "
                             "DistributedDataParallel: use strategy='ddp_lowrank'")
        self.updates = LayerwiseUpdates(optimizers[0], trainer.accumulate_grad_batches,
                                        communication=self.communication).attach()

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # Lightning's rule for "this batch steps the optimizer" (k-th micro-batch, or an epoch's last)
        self.updates.final = not trainer.fit_loop.epoch_loop._should_accumulate()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.updates is not None:
            self.updates.detach()
            self.updates = None
