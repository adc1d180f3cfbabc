"""``build_optimizer``: the one function every integration (Lightning, HF Trainer, plain loops)
calls to turn a model into a :class:`LowRankOptimizer`."""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from lit_lowrank import transforms as model_transforms
from lit_lowrank.methods import Method
from lit_lowrank.optim.lowrank import LowRankOptimizer
from lit_lowrank.targets import no_targets_message, select_targets, target_layouts
from lit_lowrank.optim.resolution import resolve

DEFAULT_TARGETS: Sequence[str] | None = None
"""``None``: the linear layers inside the network's repeated blocks (see :mod:`lit_lowrank.targets`)."""

DEFAULT_EXCLUDE: Sequence[str] = ()


def build_optimizer(
    model: nn.Module,
    *,
    method: str | Method | None = None,
    targets: Sequence[str] | None = DEFAULT_TARGETS,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    **options: Any,
) -> LowRankOptimizer:
    """A :class:`LowRankOptimizer` over ``model``: target weights in ``lowrank=True`` groups, one
    per layout (matrices; stacked experts and conv kernels where the model has such targets, see
    :mod:`lit_lowrank.optim.layouts`), the rest in a dense AdamW group. ``options`` are ``LowRankOptimizer``'s keyword arguments;
    with a ``method`` (a registered name such as ``"fira"``, or a :class:`Method`) they start
    from the method's options and replace them key by key. Frozen target weights unfrozen later
    and added with ``add_param_group`` (Lightning's ``BaseFinetuning``) are projected too: the
    optimizer's ``is_target`` knows every target.

    Raises:
        ValueError: if no weight is selected (training would silently be plain AdamW), the
            model lacks a transform the method needs (INT8 weights, weight normalization), or
            its parameters are sharded in a way the method cannot step (see
            :func:`~lit_lowrank.optim.validation.check_sharding`).
        UnknownComponentError: for an unregistered method name (the message lists them).
    """
    low_rank, dense = select_targets(model, targets, exclude)
    if not low_rank:
        raise ValueError(no_targets_message(model, targets, exclude))
    run = resolve(method, options)
    check_model_fits(model, run.transforms, method)
    layouts = target_layouts(model, targets, exclude, include_frozen=True)  # frozen ones: for add_param_group
    groups = layout_groups(low_rank, layouts)
    if dense:
        groups.append({"params": list(dense.values()), "names": list(dense), "lowrank": False})
    return LowRankOptimizer(groups, is_target=layouts.get, **run.options)


def layout_groups(low_rank: dict[str, Tensor], layouts: dict[Tensor, str]) -> list[dict[str, Any]]:
    """``lowrank=True`` param groups of the ``low_rank`` weights (by name), one per layout in the
    order met, the ``matrix`` group without a ``layout`` key (as every 2-D-only model's)."""
    groups: dict[str, dict[str, Any]] = {}
    for name, p in low_rank.items():
        layout = layouts[p]
        group = groups.setdefault(layout, {"params": [], "names": [], "lowrank": True,
                                           **({} if layout == "matrix" else {"layout": layout})})
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def check_model_fits(model: nn.Module, transforms: model_transforms.Transforms, name: object) -> None:
    """Refuse a model that lacks a transform in ``transforms`` (``{name: options}``, from the
    method or the keywords; never silently train the plain weights instead), through the one
    :func:`lit_lowrank.transforms.check`."""
    model_transforms.check(model, transforms, f"method {name!r}" if name is not None else "build_optimizer")
