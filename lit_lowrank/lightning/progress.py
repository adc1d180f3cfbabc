"""The CLI's progress bar: Lightning's rich bar, without the bogus epoch total of step-bounded
runs (``max_epochs=-1`` made it print ``Epoch 0/-2``)."""

from __future__ import annotations

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE


class StepProgressBar(RichProgressBar):
    """``Epoch 3/9`` when the run is bounded by epochs; ``Epoch 0 (max_steps 300)`` when it is
    bounded by steps (``max_epochs`` -1 or None), where Lightning's bar shows ``Epoch 0/-2``."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch} (max_steps {trainer.max_steps})"
        return f"{description:{len(self.validation_description)}}"


def progress_bar() -> ProgressBar:
    """The rich :class:`StepProgressBar` if ``rich`` is installed, else Lightning's tqdm bar
    (which shows no epoch total)."""
    return StepProgressBar() if _RICH_AVAILABLE else TQDMProgressBar()
