"""``LowRankCallback``: low-rank training for an existing LightningModule, unchanged."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from lit_lowrank.lightning.adoption import Adoption
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
    a rank-``rank`` subspace. The conversion happens at fit start, before any other callback's
    ``on_fit_start`` (this callback moves itself first in ``trainer.callbacks``), so
    ``Tuner.lr_find`` sweeps the optimizer that will train. ``enabled=False`` keeps your
    optimizers; ``layerwise=True`` adds :class:`~lit_lowrank.lightning.layerwise.LayerwiseCallback`,
    ``communication="lowrank"`` :class:`~lit_lowrank.lightning.communication.LowRankCommunicationCallback`;
    ``transforms`` (e.g. ``int-weights``) transform the target linear layers at setup. Also logs the telemetry of
    :class:`LowRankTelemetry` and prints the low-rank summary at fit start. The strategies
    ``lowrank``/``ddp_lowrank``/``fsdp_lowrank`` adopt a module the same way
    (:class:`~lit_lowrank.lightning.adoption.Adoption`).

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
        self.adoption = Adoption(config, options)

    @property
    def config(self) -> LowRankConfig:
        """The merged config of the run."""
        return self.adoption.config

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        fitting = stage == "fit"
        if fitting:
            self._refuse_other_adoptions(trainer)
        # every stage (a checkpoint holds transformed layers), before the checkpoint is restored
        self.adoption.prepare(trainer.strategy, pl_module, refuse_strategy=fitting)
        if fitting:
            added = self.adoption.callbacks(trainer, pl_module)
            # A new list: Lightning is iterating the old one to call the setup hooks, which must not
            # reach this callback again; ``added`` are already set up.
            trainer.callbacks = [self, *(c for c in trainer.callbacks if c is not self), *added]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Convert the optimizers the strategy built, then print the summary.

        ``on_fit_start`` is the first callback hook after ``Strategy.setup`` built the optimizers;
        it runs before ``Trainer.fit(ckpt_path=...)`` restores their states and the schedulers'
        (under every strategy: DDP, ``ModelParallelStrategy`` too) and before the first step.
        Lightning calls it in ``trainer.callbacks`` order and puts its tuner callbacks first
        (``LearningRateFinder`` sweeps in its own ``on_fit_start``), so :meth:`setup` moved this
        callback to the head of the list: every other callback — the tuner's sweep,
        ``BaseFinetuning`` restoring its param groups, :class:`LowRankCommunicationCallback` — sees
        the converted optimizer.
        """
        self.adoption.convert(trainer.strategy, pl_module)
        super().on_fit_start(trainer, pl_module)

    @staticmethod
    def _refuse_other_adoptions(trainer: pl.Trainer) -> None:
        """Refuse a lowrank strategy or a second LowRankCallback: each would adopt with its own config."""
        strategy = trainer.strategy
        if isinstance(getattr(strategy, "adoption", None), Adoption):
            raise ValueError(f"LowRankCallback and strategy={strategy.strategy_name!r} both convert the "
                             "optimizers, each with its own config: use one (put the options on either)")
        if sum(isinstance(c, LowRankCallback) for c in trainer.callbacks) > 1:
            raise ValueError("more than one LowRankCallback: keep one")
