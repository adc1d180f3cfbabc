"""``LowRankCallback``: low-rank training for an existing LightningModule, unchanged."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from lit_lowrank.lightning.adoption import adopt_module, lowrank_callbacks
from lit_lowrank.lightning.config_merge import adoption_config
from lit_lowrank.lightning.optimizer_conversion import convert_optimizers
from lit_lowrank.lightning.refusals import check_strategy, check_transform_trainer
from lit_lowrank.lightning.config import LowRankConfig
from lit_lowrank.lightning.telemetry import LowRankTelemetry


class LowRankCallback(LowRankTelemetry):
    """Swap the optimizers your ``configure_optimizers`` returned for LowRankOptimizers::

        trainer = Trainer(callbacks=[LowRankCallback(rank=128, update_gap=200, scale=0.25)])

    Your AdamW, Adam or SGD is reproduced in low-rank space (see
    :mod:`lit_lowrank.lightning.optimizer_conversion`; anything else is refused unless you set ``inner``):
    its learning rates, weight decays, betas or momentum and your LR schedulers are kept; the
    target weights (by default the linear layers inside the model's repeated blocks, or
    ``targets``/``exclude`` name patterns; see :func:`lit_lowrank.select_targets`) are updated in
    a rank-``rank`` subspace. The conversion happens when the strategy builds the optimizers, so
    ``Tuner.lr_find`` sweeps the optimizer that will train. ``enabled=False`` keeps your
    optimizers; ``layerwise=True`` adds :class:`~lit_lowrank.lightning.layerwise.LayerwiseCallback`,
    ``communication="lowrank"`` :class:`~lit_lowrank.lightning.communication.LowRankCommunicationCallback`;
    ``transforms`` (e.g. ``int-weights``) transform the target linear layers at setup. Also logs the telemetry of
    :class:`LowRankTelemetry` and prints the low-rank summary at fit start.

    Args:
        config: a full :class:`LowRankConfig`.
        options: :class:`LowRankConfig` fields, instead of or on top of ``config``.

    Raises:
        ValueError: if ``lr``, ``betas``, ``eps``, ``weight_decay``, ``warmup``, ``min_lr_ratio``
            or ``lr_schedule`` is set (your optimizer and scheduler own them); at setup, with
            ``strategy="lowrank"`` as well (two sources of config).
    """

    def __init__(self, config: LowRankConfig | None = None, **options: Any) -> None:
        super().__init__()
        self.config, self.explicit = adoption_config(config, options)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        adopt_module(pl_module, self.config)  # every stage (a checkpoint holds quantized layers), before restoring
        if stage != "fit":
            return
        if self.config.enabled:
            check_strategy(trainer.strategy, self.config)
        check_transform_trainer(trainer, self.config)
        from lit_lowrank.lightning.strategy import _LowRankOptimizers

        if isinstance(trainer.strategy, _LowRankOptimizers):
            raise ValueError(f"LowRankCallback and strategy={trainer.strategy.strategy_name!r} both convert the "
                             "optimizers, each with its own config: use one (put the options on either)")
        if sum(isinstance(c, LowRankCallback) for c in trainer.callbacks) > 1:
            raise ValueError("more than one LowRankCallback: keep one")
        trainer.callbacks.extend(lowrank_callbacks(trainer, pl_module, self.config))
        self._convert_when_built(trainer.strategy, pl_module)

    def _convert_when_built(self, strategy: pl.strategies.Strategy, pl_module: pl.LightningModule) -> None:
        """Convert right after ``strategy.setup_optimizers`` — before on_fit_start callbacks
        (``Tuner.lr_find``'s sweep) and before a checkpoint's optimizer state is restored."""
        build = type(strategy).setup_optimizers.__get__(strategy)

        def setup_optimizers(trainer: pl.Trainer) -> None:
            build(trainer)
            strategy.optimizers = convert_optimizers(pl_module, strategy.optimizers, strategy.lr_scheduler_configs,
                                                     self.config, self.explicit)

        strategy.setup_optimizers = setup_optimizers

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        vars(trainer.strategy).pop("setup_optimizers", None)
