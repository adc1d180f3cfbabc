"""Linear warm-up then cosine decay to a floor — the GaLore papers' LLaMA schedule."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(step: int, *, warmup: int, total: int, min_ratio: float, cosine: bool = True) -> float:
    """The LR multiplier at ``step`` (0-based).

    ``step / warmup`` during warm-up, then ``min_ratio + (1 − min_ratio)·½(1 + cos πp)`` with
    ``p`` the fraction of the decay phase done, clamped to 1 past ``total`` (as in GaLore's
    ``get_cosine_schedule_with_min_lr``).
    """
    if step < warmup:
        return step / warmup
    if not cosine:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, *, warmup: int, total: int, min_ratio: float,
                  cosine: bool = True) -> LambdaLR:
    """A :class:`LambdaLR` applying :func:`warmup_cosine_factor` to every param group."""
    return LambdaLR(optimizer, lambda step: warmup_cosine_factor(
        step, warmup=warmup, total=total, min_ratio=min_ratio, cosine=cosine))
