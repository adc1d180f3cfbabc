"""Turn the optimizers an existing LightningModule configured into :class:`LowRankOptimizer`\\ s,
keeping each param group's hyper-parameters and rebinding the LR schedulers that drove them.
Shared by :class:`LowRankCallback` and the ``lowrank`` strategies."""

from __future__ import annotations

import functools
from typing import Any

import torch
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch import nn

from lit_lowrank.lightning.config import LowRankConfig
from lit_lowrank.optim.targets import no_targets_message, select_targets
from lit_lowrank.optim.lowrank import LowRankOptimizer
from lit_lowrank.reparam.gradnorm import is_gradnorm

# torch-optimizer implementation switches that mean nothing to LowRankOptimizer
_IMPLEMENTATION_FLAGS = {"params", "foreach", "fused", "capturable", "differentiable", "amsgrad",
                         "decoupled_weight_decay", "maximize"}


def convert_optimizers(module: nn.Module, optimizers: list[torch.optim.Optimizer],
                       schedulers: list[LRSchedulerConfig], config: LowRankConfig,
                       ) -> list[torch.optim.Optimizer]:
    """Replace every optimizer holding a target weight of ``module`` by a LowRankOptimizer.

    Each user param group is split into its low-rank part (target weights) and its dense part,
    both keeping the group's ``lr``, ``weight_decay``, ``betas``, ``eps`` (and scheduler keys such
    as ``initial_lr``); the ``config``'s values only fill what the user's groups lack. Schedulers
    in ``schedulers`` are re-pointed at the new optimizer, in place. LearningRateMonitor keys stay
    the user's (``lr-AdamW/pg1``...); the dense part of a split group adds ``<key>-dense``.

    Raises:
        ValueError: if no weight matches ``config.targets``, or an optimizer maximizes.
    """
    if config.gradnorm and not any(is_gradnorm(m) for m in module.modules()):
        raise ValueError("lowrank gradnorm: true needs the weight-normalized model before Lightning sets it up: "
                         "call lit_lowrank.reparam.apply_gradnorm(self, targets) in your LightningModule's "
                         "__init__ (LowRankModule does it from its config)")
    low_rank, _ = select_targets(module, config.targets, config.exclude)
    if not low_rank:
        raise ValueError(no_targets_message(module, config.targets, config.exclude))
    targets = {id(p) for p in low_rank.values()}
    _keep_monitor_names(schedulers)
    converted = []
    for optimizer in optimizers:
        if not any(id(p) in targets for g in optimizer.param_groups for p in g["params"]):
            converted.append(optimizer)
            continue
        new, group_map = _lowrank_copy(optimizer, targets, config, module)
        for scheduler_config in schedulers:
            if scheduler_config.scheduler.optimizer is optimizer:
                _rebind(scheduler_config.scheduler, len(optimizer.param_groups), new, group_map)
        converted.append(new)
    return converted


def _lowrank_copy(optimizer: torch.optim.Optimizer, targets: set[int], config: LowRankConfig, module: nn.Module,
                  ) -> tuple[LowRankOptimizer, list[int]]:
    names = {id(p): name for name, p in module.named_parameters()}
    groups, group_map = [], []
    for index, group in enumerate(optimizer.param_groups):
        if group.get("maximize"):
            raise ValueError("LowRankOptimizer minimizes; the configured optimizer has maximize=True")
        hyper = {k: v for k, v in group.items() if k not in _IMPLEMENTATION_FLAGS}
        parts = {lowrank: [p for p in group["params"] if (id(p) in targets) == lowrank] for lowrank in (True, False)}
        for lowrank, params in parts.items():
            if params:
                label = group.get("name", f"pg{index + 1}") + ("-dense" if not lowrank and parts[True] else "")
                groups.append({**hyper, "params": params, "lowrank": lowrank, "name": label,
                               "names": [names.get(id(p), "unnamed") for p in params]})
                group_map.append(index)
    return LowRankOptimizer(groups, **config.optimizer_options()), group_map


def _keep_monitor_names(schedulers: list[LRSchedulerConfig]) -> None:
    """Name each unnamed scheduler config as LearningRateMonitor would for the user's optimizer
    (``lr-AdamW``, then ``lr-AdamW-1`` for a second AdamW), so its keys survive the conversion."""
    seen: dict[type, int] = {}
    for config in schedulers:
        if config.name is None:
            kind = type(config.scheduler.optimizer)
            seen[kind] = seen.get(kind, 0) + 1
            config.name = f"lr-{kind.__name__}" + (f"-{seen[kind] - 1}" if seen[kind] > 1 else "")


def _rebind(scheduler: Any, old_groups: int, new: LowRankOptimizer, group_map: list[int]) -> None:
    """Point ``scheduler`` at ``new``: its per-group lists (``base_lrs``, ``lr_lambdas``,
    ``_last_lr``, ...) are re-indexed so new group ``i`` follows old group ``group_map[i]``."""
    scheduler.optimizer = new
    for key, value in vars(scheduler).items():
        if isinstance(value, list) and len(value) == old_groups:
            setattr(scheduler, key, [value[i] for i in group_map])
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
