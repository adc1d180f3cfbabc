"""``LowRankCallback``: low-rank training for an existing LightningModule, unchanged."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from lit_lowrank.lightning.config import LowRankConfig
from lit_lowrank.lightning.conversion import convert_optimizers
from lit_lowrank.lightning.telemetry import LowRankTelemetry


class LowRankCallback(LowRankTelemetry):
    """Swap the optimizers your ``configure_optimizers`` returned for LowRankOptimizers::

        trainer = Trainer(callbacks=[LowRankCallback(rank=128, update_gap=200, scale=0.25)])

    Your learning rates, weight decays, betas and LR schedulers are kept; the target weights
    (by default the linear layers inside the model's repeated blocks, or ``targets``/``exclude``
    name patterns; see :func:`lit_lowrank.select_targets`) are updated in a rank-``rank`` subspace, the rest with
    AdamW. Also logs the telemetry of :class:`LowRankTelemetry`.

    Args:
        config: a full :class:`LowRankConfig` (its ``lr``/``weight_decay``/LR-schedule fields
            are ignored: yours are kept).
        options: :class:`LowRankConfig` fields, instead of or on top of ``config``.
    """

    def __init__(self, config: LowRankConfig | None = None, **options: Any) -> None:
        super().__init__()
        base = vars(config) if config is not None else {}
        self.config = LowRankConfig(**{**base, **options})

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # runs after the strategy built the optimizers and before a checkpoint is restored into
        # them, so `fit(ckpt_path=...)` resumes the low-rank state
        strategy = trainer.strategy
        strategy.optimizers = convert_optimizers(pl_module, strategy.optimizers,
                                                 strategy.lr_scheduler_configs, self.config)
        super().on_fit_start(trainer, pl_module)  # the low-rank summary
