"""How an existing LightningModule is adopted for low-rank training — one mechanism, shared by
:class:`~lit_lowrank.lightning.LowRankCallback` and the ``lowrank``/``ddp_lowrank``/``fsdp_lowrank``
strategies, which differ only in the Lightning hooks that call it:

=================  ==========================================  ==========================================
phase              strategies                                   LowRankCallback
=================  ==========================================  ==========================================
:meth:`prepare`    ``Strategy.connect``                         ``Callback.setup``
:meth:`callbacks`  ``Strategy.setup_optimizers``, first          ``Callback.setup`` (``fit``)
:meth:`convert`    ``Strategy.setup_optimizers``, after the     ``Callback.on_fit_start``, run before any
                   module's ``configure_optimizers``            other callback's
=================  ==========================================  ==========================================

Every phase runs before the first step and before a checkpoint's optimizer and scheduler states
are restored (``Trainer.fit(ckpt_path=...)`` restores them after ``on_fit_start``).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn

from lit_lowrank import transforms as model_transforms
from lit_lowrank.lightning.communication import LowRankCommunicationCallback
from lit_lowrank.lightning.config import LowRankConfig
from lit_lowrank.lightning.config_merge import adoption_config
from lit_lowrank.lightning.layerwise import LayerwiseCallback
from lit_lowrank.lightning.optimizer_conversion import convert_optimizers
from lit_lowrank.lightning.refusals import check_strategy, check_transform_trainer
from lit_lowrank.lightning.telemetry import LowRankTelemetry


class Adoption:
    """The adoption of a user's LightningModule under one :class:`LowRankConfig`.

    Args:
        config: a full :class:`LowRankConfig`, or None.
        options: :class:`LowRankConfig` fields on top of ``config``; together they make
            :attr:`config`, and :attr:`explicit` names the fields chosen for the run
            (:func:`~lit_lowrank.lightning.config_merge.adoption_config`).

    Raises:
        ValueError: for a field the module's ``configure_optimizers`` owns (``lr``, ...).
    """

    def __init__(self, config: LowRankConfig | None = None, options: dict[str, Any] | None = None) -> None:
        self.config, self.explicit = adoption_config(config, dict(options or {}))

    def prepare(self, strategy: pl.strategies.Strategy, module: nn.Module, *, refuse_strategy: bool = True) -> None:
        """Before Lightning sets the module up or restores a checkpoint into it: refuse what
        ``strategy`` cannot train (``refuse_strategy``), then apply the config's model transforms
        (:func:`adopt_module`)."""
        if refuse_strategy and self.config.enabled:
            check_strategy(strategy, self.config)
        adopt_module(module, self.config)

    def callbacks(self, trainer: pl.Trainer, module: pl.LightningModule) -> list[Callback]:
        """Refuse the trainer features the config's transforms cannot honour, and return the
        validated callbacks the run needs that ``trainer`` lacks: :class:`LowRankTelemetry`, then
        those of :func:`lowrank_callbacks`."""
        check_transform_trainer(trainer, self.config)
        telemetry = [] if any(isinstance(c, LowRankTelemetry) for c in trainer.callbacks) else [LowRankTelemetry()]
        return telemetry + lowrank_callbacks(trainer, module, self.config)

    def convert(self, strategy: pl.strategies.Strategy, module: nn.Module) -> None:
        """Once ``strategy`` built the module's optimizers: replace them by LowRankOptimizers and
        re-point its LR schedulers at them (:func:`convert_optimizers`), in place."""
        strategy.optimizers = convert_optimizers(module, strategy.optimizers, strategy.lr_scheduler_configs,
                                                 self.config, self.explicit)


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
