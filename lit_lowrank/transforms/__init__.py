"""Model transforms, a component kind (``register_transforms``): what a method changes in the
model before its optimizer is built. Every path — :class:`~lit_lowrank.lightning.LowRankConfig`,
the Lightning callback and strategies, :func:`~lit_lowrank.build_optimizer`, the memory estimator
and the benchmarks — goes through the one pair :func:`prepare` (apply what is missing) and
:func:`check` (refuse a model that lacks one), with transforms written as ``{name: options}``.

Built-ins: ``int-weights`` (Q-GaLore, :mod:`lit_lowrank.transforms.int_weights`),
``weight-norm`` (GradNormLoRP, :mod:`lit_lowrank.transforms.weight_norm`) and ``compact``
(CompAct, :mod:`lit_lowrank.transforms.compact`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import nn

from lit_lowrank.plugins import get_transform
from lit_lowrank.transforms.base import (
    StoredWeight,
    Transform,
    attach_store,
    gradient_hidden,
    hide_gradient,
    stored_weight,
)

Transforms = Mapping[str, Mapping[str, Any] | None]
"""Transforms as a method, a YAML config or a keyword names them: ``{name: options}``."""

__all__ = ["StoredWeight", "Transform", "Transforms", "attach_store", "bind", "build", "check", "gradient_hidden",
           "hide_gradient", "prepare", "stored_weight"]


def build(transforms: Transforms | None) -> list[Transform]:
    """The :class:`Transform` instances ``transforms`` names (registered names, their options);
    refuses unknown names, unknown options and two transforms of the target layers themselves."""
    built = [get_transform(name)(**dict(options or {})) for name, options in (transforms or {}).items()]
    changing = [t.name for t in built if t.changes_targets]
    if len(changing) > 1:
        raise ValueError(f"transforms {changing} each change the target layers; a run trains one of them, not "
                         f"several: keep one in `transforms`")
    return built


def prepare(model: nn.Module, transforms: Transforms | None, targets: Sequence[str] | None = None,
            exclude: Sequence[str] = ()) -> nn.Module:
    """Apply, in place, each transform of ``transforms`` that ``model`` does not hold yet to its
    low-rank ``targets`` (the optimizer's ``targets``/``exclude``); returns ``model``.

    Raises:
        ValueError: a model holding a transform with other options (build a fresh model), or what
            a transform's ``apply`` refuses (no target, a non-linear target, tied weights).
    """
    for transform in build(transforms):
        if transform.applied(model):
            continue
        if transform.held(model):
            raise ValueError(f"the model already holds transform {transform.name!r} with other options than "
                             f"{transform.options}; build a fresh model or match its options")
        transform.apply(model, targets, exclude)
    return model


def check(model: nn.Module, transforms: Transforms | None, asker: str = "build_optimizer") -> list[Transform]:
    """Refuse a ``model`` lacking a transform of ``transforms`` (never silently train the plain
    weights instead); returns the transforms, for :func:`bind`.

    Raises:
        ValueError: naming the transform and the call that applies it.
    """
    built = build(transforms)
    for transform in built:
        if not transform.applied(model):
            raise ValueError(f"{asker} trains {transform.describe()}, but {transform.found(model)}: call "
                             f"{transform.fix()} (the Lightning config does it from lowrank.transforms)")
    return built


def bind(model: nn.Module, transforms: Transforms | None, optimizer: Any) -> None:
    """Bind each transform of ``transforms`` to ``optimizer`` built over ``model``."""
    for transform in build(transforms):
        transform.bind(model, optimizer)
