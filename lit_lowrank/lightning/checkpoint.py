"""``LastStepCheckpoint``: Lightning's ``ModelCheckpoint`` that also saves the step training
stopped at, so every run leaves a resumable checkpoint of its final state."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint


class LastStepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (same arguments) plus one save when training ends at a step not saved yet.

    ``ModelCheckpoint`` saves on its triggers only (every ``every_n_train_steps`` steps, at epoch
    or validation ends), so a run whose ``max_steps`` is not a multiple of the interval, or that
    stops on ``max_time`` or early stopping, loses every step since the last trigger
    (``--trainer.max_steps 20`` with ``every_n_train_steps: 100`` saves nothing). Here, when
    ``fit`` ends, the final step is saved too: without a ``monitor`` as one more periodic
    checkpoint (``save_top_k: 1`` keeps only the newest, ``epoch=E-step=S.ckpt``), with a
    ``monitor`` as ``last.ckpt`` — which then needs ``save_last``.

    Resume with ``fit --ckpt_path <that file>`` (raise ``max_steps`` to train further).

    Raises:
        ValueError: a ``monitor`` without ``save_last`` (the final step could be dropped as
            not among the best).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.monitor is not None and not self.save_last:
            raise ValueError(f"LastStepCheckpoint(monitor={self.monitor!r}) keeps the final step as last.ckpt: "
                             "set save_last=True (or 'link')")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self._should_skip_saving_checkpoint(trainer):  # not fitting, fast_dev_run, or this step saved
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is None:
            self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
