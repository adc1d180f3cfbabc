"""The ``"lowrank"`` and ``"ddp_lowrank"`` strategies: ``Trainer(strategy="lowrank")`` trains
an existing LightningModule with LowRankOptimizers in place of the optimizers it configures.

Registered in Lightning's ``StrategyRegistry`` when :mod:`lit_lowrank.lightning` is imported.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, StrategyRegistry
from typing_extensions import override

from lit_lowrank.lightning.config import LowRankConfig
from lit_lowrank.lightning.conversion import adopt_module, adoption_config, convert_optimizers, lowrank_callbacks
from lit_lowrank.lightning.telemetry import LowRankTelemetry


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
        adopt_module(model, self.lowrank)  # before configure_optimizers and checkpoint restoring

    @override
    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        super().setup_optimizers(trainer)  # type: ignore[misc]
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
    computes the same SVD and holds the same projectors. ``ddp_kwargs`` go to ``DDPStrategy``."""

    strategy_name = "ddp_lowrank"

    def __init__(self, lowrank: LowRankConfig | None = None, ddp_kwargs: dict[str, Any] | None = None,
                 **options: Any) -> None:
        super().__init__(**(ddp_kwargs or {}))
        self.lowrank, self.explicit = adoption_config(lowrank, options)


def register_strategies() -> None:
    """Add ``lowrank`` and ``ddp_lowrank`` to Lightning's StrategyRegistry (idempotent)."""
    for cls, description in ((LowRankStrategy, "single device, LowRankOptimizer in place of the module's"),
                             (DDPLowRankStrategy, "DDP, LowRankOptimizer in place of the module's")):
        if cls.strategy_name not in StrategyRegistry:
            StrategyRegistry.register(cls.strategy_name, cls, description=description)
