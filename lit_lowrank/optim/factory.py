"""``build_optimizer``: the one function every integration (Lightning, HF Trainer, plain loops)
calls to turn a model into a :class:`LowRankOptimizer`."""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from lit_lowrank.optim.lowrank import LowRankOptimizer
from lit_lowrank.optim.targets import no_targets_message, select_targets

DEFAULT_TARGETS: Sequence[str] | None = None
"""``None``: the linear layers inside the network's repeated blocks (see :mod:`lit_lowrank.optim.targets`)."""

DEFAULT_EXCLUDE: Sequence[str] = ()


def build_optimizer(
    model: nn.Module,
    *,
    targets: Sequence[str] | None = DEFAULT_TARGETS,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    **options: Any,
) -> LowRankOptimizer:
    """A :class:`LowRankOptimizer` over ``model``: target weights in a ``lowrank=True`` group,
    the rest in a dense AdamW group. ``options`` are ``LowRankOptimizer``'s keyword arguments.
    Frozen target weights unfrozen later and added with ``add_param_group`` (Lightning's
    ``BaseFinetuning``) are projected too: the optimizer's ``is_target`` knows every target.

    Raises:
        ValueError: if no weight is selected (training would silently be plain AdamW).
    """
    low_rank, dense = select_targets(model, targets, exclude)
    if not low_rank:
        raise ValueError(no_targets_message(model, targets, exclude))
    groups = [{"params": list(low_rank.values()), "names": list(low_rank), "lowrank": True}]
    if dense:
        groups.append({"params": list(dense.values()), "names": list(dense), "lowrank": False})
    targets_incl_frozen = frozenset(select_targets(model, targets, exclude, include_frozen=True)[0].values())
    return LowRankOptimizer(groups, is_target=targets_incl_frozen.__contains__, **options)
