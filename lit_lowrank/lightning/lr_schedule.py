"""Linear warm-up then decay to a floor: cosine (the GaLore papers' LLaMA schedule), linear (their
GLUE fine-tuning, HF's ``get_linear_schedule_with_warmup``) or none."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

DECAYS = ("cosine", "linear", "constant")


def warmup_decay_factor(step: int, *, warmup: int, total: int, min_ratio: float, decay: str = "cosine") -> float:
    """The LR multiplier at ``step`` (0-based).

    ``step / warmup`` during warm-up; then, with ``p`` the fraction of the decay phase done
    (clamped to 1 past ``total``), ``min_ratio + (1 − min_ratio)·½(1 + cos πp)`` for ``cosine``
    (GaLore's ``get_cosine_schedule_with_min_lr``), ``min_ratio + (1 − min_ratio)(1 − p)`` for
    ``linear``, and 1 for ``constant``.
    """
    if decay not in DECAYS:
        raise ValueError(f"unknown LR decay {decay!r}; expected one of {DECAYS}")
    if step < warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if decay == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if decay == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    return 1.0


class GrowingLambdaLR(LambdaLR):
    """A :class:`LambdaLR` that also schedules param groups added after it was built (layers
    unfrozen with ``add_param_group``, e.g. by Lightning's ``BaseFinetuning``; torch's own
    schedulers fail on them): each new group takes its ``lr`` when added as its base LR and the
    first group's factor."""

    def get_lr(self) -> list[float]:
        for group in self.optimizer.param_groups[len(self.base_lrs):]:
            self.base_lrs.append(group.setdefault("initial_lr", group["lr"]))
            self.lr_lambdas.append(self.lr_lambdas[0])
        return super().get_lr()


def warmup_decay(optimizer: torch.optim.Optimizer, *, warmup: int, total: int, min_ratio: float,
                 decay: str = "cosine") -> LambdaLR:
    """A :class:`GrowingLambdaLR` applying :func:`warmup_decay_factor` to every param group."""
    return GrowingLambdaLR(optimizer, lambda step: warmup_decay_factor(
        step, warmup=warmup, total=total, min_ratio=min_ratio, decay=decay))
