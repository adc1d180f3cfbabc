"""Adopting an existing LightningModule: its model transforms applied, and the callbacks its
config needs; shared by :class:`~lit_lowrank.lightning.LowRankCallback` and the ``lowrank`` strategies."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn

from lit_lowrank import transforms as model_transforms
from lit_lowrank.lightning.communication import LowRankCommunicationCallback
from lit_lowrank.lightning.config import LowRankConfig
from lit_lowrank.lightning.layerwise import LayerwiseCallback


def adopt_module(module: nn.Module, config: LowRankConfig) -> None:
    """Apply ``config``'s model transforms to a user's module, in place and once
    (:func:`lit_lowrank.transforms.prepare`), except those that replace parameters the module's
    ``configure_optimizers`` may hold (``weight-norm``): :func:`convert_optimizers` refuses a
    module without them."""
    if not config.enabled:
        return
    adoptable = {t.name: t.options for t in model_transforms.build(config.transforms) if t.adopts_modules}
    model_transforms.prepare(module, adoptable, config.targets, config.exclude)


def lowrank_callbacks(trainer: pl.Trainer, module: pl.LightningModule, config: LowRankConfig) -> list[Callback]:
    """The validated callbacks ``config`` needs that the trainer lacks: :class:`LayerwiseCallback`
    for ``layerwise``, else :class:`LowRankCommunicationCallback` for ``communication: lowrank``;
    raises what their ``setup`` refuses (clipping, fp16, no DDP, ...)."""
    wanted = config_callbacks(config)
    callbacks = [c for c in wanted if not any(isinstance(t, type(c)) for t in trainer.callbacks)]
    for callback in callbacks:
        callback.setup(trainer, module, "fit")
    return callbacks


def config_callbacks(config: LowRankConfig) -> list[Callback]:
    """Fresh instances of the callbacks ``config`` asks for (see :func:`lowrank_callbacks`)."""
    if not config.enabled:
        return []
    if config.layerwise:
        return [LayerwiseCallback(config.communication)]
    if config.communication == "lowrank":
        return [LowRankCommunicationCallback()]
    return []
