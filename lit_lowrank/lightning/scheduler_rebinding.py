"""Re-point a user's LR schedulers at the :class:`LowRankOptimizer` that replaced the optimizer they
drove, group by group, so the schedule and its LearningRateMonitor keys carry on unchanged."""

from __future__ import annotations

import functools
from typing import Any

import torch
from lightning.pytorch.utilities.types import LRSchedulerConfig

from lit_lowrank.optim.lowrank import LowRankOptimizer

PER_GROUP = ("base_lrs", "_last_lr", "lr_lambdas", "min_lrs", "max_lrs", "base_momentums", "max_momentums")
"""The per-param-group lists of torch's LR schedulers (one entry per group, in group order)."""

COMPOSITE = (torch.optim.lr_scheduler.SequentialLR, torch.optim.lr_scheduler.ChainedScheduler)
"""Schedulers driving sub-schedulers (``_schedulers``), each bound to the optimizer itself."""


def keep_monitor_names(schedulers: list[LRSchedulerConfig]) -> None:
    """Name each unnamed scheduler config as LearningRateMonitor would for the user's optimizer
    (``lr-AdamW``, then ``lr-AdamW-1`` for a second AdamW), so its keys survive the conversion."""
    seen: dict[type, int] = {}
    for config in schedulers:
        if config.name is None:
            kind = type(config.scheduler.optimizer)
            seen[kind] = seen.get(kind, 0) + 1
            config.name = f"lr-{kind.__name__}" + (f"-{seen[kind] - 1}" if seen[kind] > 1 else "")


def rebind_scheduler(scheduler: Any, old_groups: int, new: LowRankOptimizer, group_map: list[int]) -> None:
    """Point ``scheduler`` (and the sub-schedulers of a :data:`COMPOSITE` one) at ``new``: its
    per-group lists (:data:`PER_GROUP`) are re-indexed so new group ``i`` follows old group
    ``group_map[i]`` (``old_groups``: the group count of the optimizer it drove).

    Raises:
        ValueError: for a scheduler class outside torch holding another list with one entry per
            old group while groups were split (it cannot be told whether that list is per group).
    """
    for sub in getattr(scheduler, "_schedulers", []) if isinstance(scheduler, COMPOSITE) else []:
        rebind_scheduler(sub, old_groups, new, group_map)
    split = group_map != list(range(old_groups))
    for key, value in vars(scheduler).items():
        if not isinstance(value, list) or len(value) != old_groups or key == "_schedulers":
            continue
        if key in PER_GROUP:
            setattr(scheduler, key, [value[i] for i in group_map])
        elif split and not type(scheduler).__module__.startswith("torch."):
            raise ValueError(f"{type(scheduler).__name__}.{key} holds {old_groups} entries, one per param group of "
                             f"the optimizer it drives, but the low-rank conversion splits those groups into "
                             f"{len(group_map)}: put the target weights and the others in separate param groups of "
                             "your optimizer (then no group is split)")
    scheduler.optimizer = new
    _track_step_calls(new)


def _track_step_calls(optimizer: torch.optim.Optimizer) -> None:
    # torch schedulers wrap optimizer.step at construction to check the call order (and warn
    # "optimizer.step() has been overridden" otherwise); do the same for the new optimizer.
    step = optimizer.step

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        optimizer._opt_called = True
        return step(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True
    optimizer.step = wrapper
