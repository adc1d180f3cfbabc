"""``LayerwiseCallback``: layer-wise updates (:class:`~lit_lowrank.optim.layerwise.LayerwiseUpdates`)
under Lightning's automatic optimization, with ``accumulate_grad_batches`` honoured."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

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

    Raises (at setup, naming the fix):
        ValueError: with ``gradient_clip_val`` (global norm clipping needs every gradient at
            once), with fp16 gradient scaling (the scaler unscales gradients after backward),
            with manual optimization, or with more than one process (DDP all-reduces gradients
            after the hooks ran).
    """

    def __init__(self) -> None:
        self.updates: LayerwiseUpdates | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.gradient_clip_val:
            raise ValueError(
                f"layer-wise updates cannot clip by the global gradient norm (gradient_clip_val="
                f"{trainer.gradient_clip_val}): each gradient is freed before the next one exists. "
                "Set Trainer(gradient_clip_val=None), or layerwise: false.")
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError("layer-wise updates run before the fp16 gradient scaler could unscale the gradients; "
                             "use precision='bf16-mixed' or '32-true', or layerwise: false.")
        if not pl_module.automatic_optimization:
            raise ValueError("LayerwiseCallback drives Lightning's automatic optimization; with "
                             "automatic_optimization=False attach lit_lowrank.optim.layerwise.LayerwiseUpdates "
                             "to your optimizer yourself.")
        if trainer.world_size > 1:
            raise ValueError(f"layer-wise updates are single-process (world_size={trainer.world_size}): DDP "
                             "all-reduces gradients after the per-parameter hooks have already stepped; "
                             "use one device or layerwise: false.")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after the optimizers were built (and converted by LowRankCallback) and a checkpoint restored
        optimizers = [o for o in trainer.optimizers if isinstance(o, LowRankOptimizer)]
        if len(optimizers) != 1 or len(trainer.optimizers) != 1:
            kinds = [type(o).__name__ for o in trainer.optimizers]
            raise ValueError(f"layer-wise updates need exactly one optimizer, a LowRankOptimizer; got {kinds}. "
                             "Set lowrank.enabled: true (LowRankModule) or add LowRankCallback.")
        self.updates = LayerwiseUpdates(optimizers[0], trainer.accumulate_grad_batches).attach()

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
