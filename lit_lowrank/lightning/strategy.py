"""The ``"lowrank"`` and ``"ddp_lowrank"`` strategies: ``Trainer(strategy="lowrank")`` trains
an existing LightningModule with LowRankOptimizers in place of the optimizers it configures.

Registered in Lightning's ``StrategyRegistry`` when :mod:`lit_lowrank.lightning` is imported.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, StrategyRegistry
from typing_extensions import override

from lit_lowrank.lightning.config import LowRankConfig
from lit_lowrank.lightning.layerwise import LayerwiseCallback
from lit_lowrank.lightning.module import LowRankModule
from lit_lowrank.lightning.conversion import (
    adopt_module, adoption_config, check_compact_trainer, convert_optimizers, lowrank_callbacks,
)
from lit_lowrank.lightning.telemetry import LowRankTelemetry
from lit_lowrank.optim.communication import sync_module_states


class _LowRankOptimizers:
    """Mixin: before setup, apply the model transforms of the config (``weight_bits``); after
    the wrapped strategy built the module's optimizers, convert them (and log
    :class:`LowRankTelemetry` unless the trainer already does; add
    :class:`~lit_lowrank.lightning.layerwise.LayerwiseCallback` for ``layerwise=True`` and
    :class:`~lit_lowrank.lightning.communication.LowRankCommunicationCallback` for
    ``communication="lowrank"``)."""

    lowrank: LowRankConfig
    explicit: frozenset[str]

    @override
    def connect(self, model: pl.LightningModule) -> None:
        super().connect(model)  # type: ignore[misc]
        if isinstance(model, LowRankModule):  # it builds its own LowRankOptimizer from its lowrank section
            if self.explicit:
                raise ValueError(f"{sorted(self.explicit)} set on strategy={self.strategy_name!r}, but LowRankModule "
                                 "takes its optimizer from its own lowrank section: set them there")
            self.lowrank = model.lowrank
            return
        adopt_module(model, self.lowrank)  # before configure_optimizers and checkpoint restoring

    @override
    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        super().setup_optimizers(trainer)  # type: ignore[misc]
        if isinstance(self.lightning_module, LowRankModule):
            return  # its optimizer and callbacks come from its own config
        if self.lowrank.compact:
            check_compact_trainer(trainer)
        self.optimizers = convert_optimizers(self.lightning_module, self.optimizers,
                                             self.lr_scheduler_configs, self.lowrank, self.explicit)
        if not any(isinstance(callback, LowRankTelemetry) for callback in trainer.callbacks):
            trainer.callbacks.append(LowRankTelemetry())
        trainer.callbacks.extend(lowrank_callbacks(trainer, self.lightning_module, self.lowrank))


class LowRankStrategy(_LowRankOptimizers, SingleDeviceStrategy):
    """Single-device training with LowRankOptimizers.

    Args:
        lowrank: the :class:`LowRankConfig`; as for :class:`~lit_lowrank.lightning.LowRankCallback`,
            ``lr``/``betas``/``eps``/``weight_decay`` and the LR-schedule fields are refused (the
            module's optimizer and scheduler own them).
        device: default ``cuda:0`` if available, else ``cpu``.
        options: :class:`LowRankConfig` fields (e.g. ``rank=128``) on top of ``lowrank``.
    """

    strategy_name = "lowrank"

    def __init__(self, lowrank: LowRankConfig | None = None, device: str | torch.device | None = None,
                 **options: Any) -> None:
        device = device or ("cuda:0" if torch.cuda.is_available() else "cpu")
        super().__init__(device=device)
        self.lowrank, self.explicit = adoption_config(lowrank, options)


class DDPLowRankStrategy(_LowRankOptimizers, DDPStrategy):
    """DDP with LowRankOptimizers: gradients are all-reduced before the step, so every rank
    computes the same SVD and holds the same projectors. ``ddp_kwargs`` go to ``DDPStrategy``.

    ``communication="lowrank"`` all-reduces ``R = PᵀG`` of target weights between refreshes.
    In layer-wise mode (``layerwise=True``, or a LowRankModule whose config says so) the model is
    not wrapped in DistributedDataParallel: its weights are broadcast from rank 0 once, and the
    per-parameter hooks all-reduce each gradient themselves inside backward
    (:class:`~lit_lowrank.optim.layerwise.LayerwiseUpdates`). Also trains a
    :class:`~lit_lowrank.lightning.LowRankModule`, with the options of its own ``lowrank`` section.
    """

    strategy_name = "ddp_lowrank"

    def __init__(self, lowrank: LowRankConfig | None = None, ddp_kwargs: dict[str, Any] | None = None,
                 **options: Any) -> None:
        super().__init__(**(ddp_kwargs or {}))
        self.lowrank, self.explicit = adoption_config(lowrank, options)

    def reduces_in_backward(self) -> bool:
        """Whether layer-wise hooks reduce the gradients (then the model is not DDP-wrapped)."""
        trainer = self.lightning_module.trainer
        return (self.lowrank.enabled and self.lowrank.layerwise) or any(
            isinstance(callback, LayerwiseCallback) for callback in trainer.callbacks)

    @override
    def _setup_model(self, model: nn.Module) -> nn.Module:
        if self.reduces_in_backward():
            sync_module_states(model)  # what DDP does when it wraps a model
            return model
        return super()._setup_model(model)

    @override
    def _register_ddp_hooks(self) -> None:
        if isinstance(self.model, DistributedDataParallel):
            super()._register_ddp_hooks()


def register_strategies() -> None:
    """Add ``lowrank`` and ``ddp_lowrank`` to Lightning's StrategyRegistry (idempotent)."""
    for cls, description in ((LowRankStrategy, "single device, LowRankOptimizer in place of the module's"),
                             (DDPLowRankStrategy, "DDP, LowRankOptimizer in place of the module's")):
        if cls.strategy_name not in StrategyRegistry:
            StrategyRegistry.register(cls.strategy_name, cls, description=description)
