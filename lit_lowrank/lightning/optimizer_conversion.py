"""Turn the optimizers an existing LightningModule configured into :class:`LowRankOptimizer`\\ s
that reproduce them in low-rank space, and rebind the LR schedulers that drove them
(:mod:`lit_lowrank.lightning.scheduler_rebinding`). Used by :class:`~lit_lowrank.lightning.adoption.Adoption`,
for :class:`LowRankCallback` and the ``lowrank`` strategies.

=========================  =============================================================
user's optimizer           LowRankOptimizer group
=========================  =============================================================
``torch.optim.AdamW``      ``inner=adamw``; lr, betas, eps, decoupled weight decay kept
``torch.optim.Adam``       ``inner=adamw`` with Adam's coupled L2 (``G + λW`` is projected;
                           dense params step with torch Adam); ``decoupled_weight_decay=True``
                           kept as decoupled
``torch.optim.SGD``        ``inner=sgd``; lr, momentum, dampening, nesterov kept, coupled L2
                           weight decay; dense params step with torch SGD's update
=========================  =============================================================

Anything else — ``amsgrad=True``, ``differentiable=True``, a momentum-cycling scheduler, an
unknown param-group key, any other optimizer class — is refused unless the user names ``inner``
explicitly, which accepts the substitution (the groups' lr and weight decay are kept, decoupled;
the log line says what is not). ``maximize=True`` is always refused.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch import Tensor, nn

from lit_lowrank import plugins
from lit_lowrank import transforms as model_transforms
from lit_lowrank.lightning.config import LowRankConfig
from lit_lowrank.lightning.scheduler_rebinding import keep_monitor_names, rebind_scheduler
from lit_lowrank.optim.layouts import LAYOUTS
from lit_lowrank.optim.lowrank import LowRankOptimizer
from lit_lowrank.optim.validation import accepted
from lit_lowrank.options import having
from lit_lowrank.targets import no_targets_message, target_layouts
from lit_lowrank.transforms.base import Transform

_IMPLEMENTATION = ("foreach", "fused", "capturable")  # kernel choices: the maths is the same
_REFUSED_FLAGS = {"amsgrad": "amsgrad=True (a running maximum of the second moment)",
                  "differentiable": "differentiable=True (autograd through the step)"}
_CARRIED = ("initial_lr", "max_lr", "min_lr", "name")  # scheduler and logging keys, kept as they are


def _adam(group: dict[str, Any]) -> dict[str, Any]:
    return {"lr": group["lr"], "betas": tuple(group["betas"]), "eps": group["eps"],
            "weight_decay": group["weight_decay"], "decoupled_weight_decay": bool(group["decoupled_weight_decay"]),
            "inner": "adamw", "inner_args": {}}


def _sgd(group: dict[str, Any]) -> dict[str, Any]:
    return {"lr": group["lr"], "weight_decay": group["weight_decay"], "decoupled_weight_decay": False,
            "inner": "sgd", "inner_args": {k: group[k] for k in ("momentum", "dampening", "nesterov")}}


CONVERSIONS: dict[type, tuple[Callable[[dict[str, Any]], dict[str, Any]], tuple[str, ...]]] = {
    torch.optim.AdamW: (_adam, ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay")),
    torch.optim.Adam: (_adam, ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay")),
    torch.optim.SGD: (_sgd, ("lr", "momentum", "dampening", "nesterov", "weight_decay")),
}
"""Supported optimizer classes (exactly, not subclasses): the function mapping one of its param
groups to LowRankOptimizer group options, and the group keys it reproduces."""


def convert_optimizers(module: nn.Module, optimizers: list[torch.optim.Optimizer],
                       schedulers: list[LRSchedulerConfig], config: LowRankConfig,
                       explicit: frozenset[str] = frozenset()) -> list[torch.optim.Optimizer]:
    """Replace every optimizer holding a target weight of ``module`` by a LowRankOptimizer.

    Each user param group is split into its low-rank part (target weights) and its dense part,
    both reproducing the group's optimizer as :data:`CONVERSIONS` says; the new optimizer's
    ``defaults`` come from the user's, so groups added later inherit them. Schedulers in
    ``schedulers`` are re-pointed at the new optimizer, in place. ``explicit`` holds the config
    fields the user set (an explicit ``inner`` accepts substituting an unsupported optimizer).
    LearningRateMonitor keys stay the user's (``lr-AdamW/pg1``...); the dense part of a split
    group adds ``<key>-dense``.

    Raises:
        ValueError: if no weight matches ``config.targets``, or an optimizer cannot be reproduced
            (naming it and the opt-in).
    """
    if not config.enabled:
        rank_zero_info("lit_lowrank: enabled=False, the configured optimizers train unchanged")
        return optimizers
    transforms = model_transforms.build(config.transforms)
    for transform in transforms:
        if not transform.applied(module):
            raise ValueError(f"lowrank transforms {transform.name!r} needs the transformed model before Lightning "
                             f"sets it up: call {transform.fix()}, in your LightningModule's __init__ "
                             "(LowRankModule does it from its config)")
    targets = {id(p): layout for p, layout in target_layouts(module, config.targets, config.exclude).items()}
    if not targets:
        raise ValueError(no_targets_message(module, config.targets, config.exclude))
    is_target = target_layouts(module, config.targets, config.exclude, include_frozen=True)
    keep_monitor_names(schedulers)
    converted = []
    for optimizer in optimizers:
        if not any(id(p) in targets for g in optimizer.param_groups for p in g["params"]):
            converted.append(optimizer)
            continue
        new, group_map = _lowrank_copy(optimizer, targets, config, explicit, module, is_target)
        for scheduler_config in schedulers:
            if scheduler_config.scheduler.optimizer is optimizer:
                rebind_scheduler(scheduler_config.scheduler, len(optimizer.param_groups), new, group_map)
        converted.append(new)
    _bind(module, [t for t in transforms if type(t).bind is not Transform.bind], converted)
    return converted


def _bind(module: nn.Module, transforms: list[Transform], converted: list[torch.optim.Optimizer]) -> None:
    """Bind ``transforms`` (those with a :meth:`~Transform.bind`) to the one LowRankOptimizer."""
    if not transforms:
        return
    lowrank = [o for o in converted if isinstance(o, LowRankOptimizer)]
    if len(lowrank) != 1:
        raise ValueError(f"transforms {[t.name for t in transforms]} bind the transformed layers to one optimizer, "
                         f"but {len(lowrank)} hold target weights; put the targets in one optimizer")
    for transform in transforms:
        transform.bind(module, lowrank[0])


def _lowrank_copy(optimizer: torch.optim.Optimizer, targets: dict[int, str], config: LowRankConfig,
                  explicit: frozenset[str], module: nn.Module, is_target: dict[Tensor, str],
                  ) -> tuple[LowRankOptimizer, list[int]]:
    """The LowRankOptimizer reproducing ``optimizer`` and, per new group, its old group's index.
    ``targets`` gives the layout of each target (by id); a group holding several is split, one
    group per layout and one dense. ``is_target`` (every target weight, frozen ones included)
    splits groups added later."""
    convert, dropped = _group_converter(optimizer, config, explicit)
    names = {id(p): name for name, p in module.named_parameters()}
    groups, group_map = [], []
    for index, group in enumerate(optimizer.param_groups):
        options = {**convert(group), **{k: group[k] for k in _CARRIED if k in group}}
        layouts = [targets.get(id(p)) for p in group["params"]]
        chosen = {layout: [i for i, found in enumerate(layouts) if found == layout] for layout in (*LAYOUTS, None)}
        first = next((layout for layout in chosen if chosen[layout]), None)  # keeps the group's own name
        for layout, indices in chosen.items():
            if indices:
                params = [group["params"][i] for i in indices]
                suffix = "" if layout == first else "-dense" if layout is None else f"-{layout}"
                label = group.get("name", f"pg{index + 1}") + suffix
                split = {"params": params, "lowrank": layout is not None, "name": label,
                         "names": [names.get(id(p), "unnamed") for p in params]}
                if layout not in (None, "matrix"):
                    split["layout"] = layout
                if "param_names" in group:
                    split["param_names"] = [group["param_names"][i] for i in indices]
                groups.append({**options, **split})
                group_map.append(index)
    new = LowRankOptimizer(groups, is_target=is_target.get, **config.optimizer_options())
    new.defaults.update(convert(optimizer.defaults))  # for add_param_group (e.g. BaseFinetuning)
    projected = sum(len(g["params"]) for g in groups if g["lowrank"])
    dense = sum(len(g["params"]) for g in groups if not g["lowrank"])
    rank_zero_info(f"lit_lowrank: converted {_describe(optimizer)} → LowRankOptimizer(inner={groups[0]['inner']}, "
                   f"rule={config.rule}, projector={config.projector}, rank={config.rank}): {projected} weights "
                   f"projected, {dense} dense")
    if dropped:
        rank_zero_warn(f"lit_lowrank: {_describe(optimizer)} is replaced by inner={config.inner!r} (chosen by "
                       f"{'method ' + repr(config.method) if config.method else 'inner='}); its {dropped} are not "
                       f"reproduced, the groups keep {[k for k in _SUBSTITUTE_KEEPS if k in groups[0]]}")
    return new, group_map


def _group_converter(optimizer: torch.optim.Optimizer, config: LowRankConfig, explicit: frozenset[str],
                     ) -> tuple[Callable[[dict[str, Any]], dict[str, Any]], list[str]]:
    """The function mapping ``optimizer``'s groups (and defaults) to LowRankOptimizer group
    options, and the user keys it does not reproduce (non-empty only for an explicit substitute).

    Raises:
        ValueError: naming the optimizer, what cannot be reproduced and the opt-in ``inner=``.
    """
    name = type(optimizer).__name__
    if isinstance(optimizer, LowRankOptimizer):
        raise ValueError("configure_optimizers already returns a LowRankOptimizer: remove LowRankCallback / "
                         "strategy='lowrank', or return your torch optimizer and let them convert it")
    if any(g.get("maximize") for g in optimizer.param_groups):
        raise ValueError(f"{name} has maximize=True; LowRankOptimizer minimizes: negate your loss instead")
    convert, reproduced = CONVERSIONS.get(type(optimizer), (None, ()))
    keys = {k for g in optimizer.param_groups for k in g} - {"params", "param_names", *_CARRIED, *_IMPLEMENTATION}
    problems = [why for flag, why in _REFUSED_FLAGS.items() if any(g.get(flag) for g in optimizer.param_groups)]
    if any("base_momentum" in g for g in optimizer.param_groups):
        problems.append("a scheduler cycling its momentum/betas (cycle_momentum=True)")
    unknown = sorted(keys - set(reproduced) - set(_REFUSED_FLAGS) - {"maximize", "base_momentum", "max_momentum"})
    if convert is None:
        problems.append(f"{name} has no low-rank equivalent (supported: {[c.__name__ for c in CONVERSIONS]})")
    elif unknown:
        problems.append(f"param-group keys {unknown}")
    default_inner = convert(optimizer.defaults)["inner"] if convert is not None else None
    natural = not problems and ("inner" not in explicit or config.inner == default_inner)
    if natural:
        if "inner_args" in explicit:
            raise ValueError(f"inner_args is set, but the {name} conversion takes its hyper-parameters from the "
                             f"{name} param groups: set them on your {name} (or set inner= too, to substitute)")
        return convert, []
    if "inner" not in explicit:
        raise ValueError(f"cannot reproduce {name} in low-rank space: {'; '.join(problems)}. Use AdamW, Adam or SGD "
                         "without these options, or accept a substitute by setting inner= explicitly (e.g. "
                         "LowRankCallback(inner='adamw', ...)): the groups' lr and weight_decay are kept, the rest not")
    inner_takes = set(accepted(plugins.get_inner_optimizer(config.inner)))
    keeps = [k for k in _SUBSTITUTE_KEEPS if k not in ("betas", "eps") or k in inner_takes]

    def substitute(group: dict[str, Any]) -> dict[str, Any]:
        reproduced = convert(group) if convert is not None else group
        kept = {k: reproduced[k] for k in keeps if k in reproduced}
        return {**kept, "inner": config.inner, "inner_args": dict(config.inner_args)}

    return substitute, sorted(k for k in keys - set(keeps) if _lost(k, optimizer.param_groups))


def _lost(key: str, groups: list[dict[str, Any]]) -> bool:
    """Whether a substitute (no momentum, no flags; decoupled weight decay for classes without a
    conversion) changes what ``key`` asked for in ``groups``."""
    if key == "decoupled_weight_decay":
        return not all(g[key] for g in groups if key in g)
    return any(g.get(key) not in (None, False, 0) for g in groups)


_SUBSTITUTE_KEEPS = (*having("user"), "decoupled_weight_decay")
"""What a substitute inner optimizer keeps of the user's groups (``betas``/``eps`` only if it takes them)."""


def _describe(optimizer: torch.optim.Optimizer) -> str:
    """``SGD(lr=0.1, momentum=0.9, nesterov=True)``: the non-default hyper-parameters."""
    _, reproduced = CONVERSIONS.get(type(optimizer), (None, ("lr",)))
    values = ", ".join(f"{k}={optimizer.defaults[k]}" for k in reproduced if k in optimizer.defaults
                       and (k == "lr" or optimizer.defaults[k] not in (0, False, None)))
    return f"{type(optimizer).__name__}({values})"
