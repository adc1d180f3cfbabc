"""The trainer features that read weight gradients after backward — norm clipping and the fp16
scaler — refused for the modes that change which gradients exist when they would run."""

from __future__ import annotations

import lightning.pytorch as pl


def refuse_gradient_readers(trainer: pl.Trainer, *, feature: str, clipping: str, scaling: str, off: str) -> None:
    """Raise a ValueError if ``trainer`` clips gradients by norm or scales fp16 gradients.

    Args:
        feature: the mode, as the user set it (``"layerwise: true"``).
        clipping, scaling: why that mode and the feature cannot go together.
        off: the setting that turns the mode off (the alternative fix).
    """
    if trainer.gradient_clip_val:
        raise ValueError(f"{feature}: {clipping} (gradient_clip_val={trainer.gradient_clip_val}); set "
                         f"gradient_clip_val=None, or {off}")
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        raise ValueError(f"{feature}: {scaling}; use precision='bf16-mixed' or '32-true', or {off}")
