"""The updates a step writes last, in the apply phase of :mod:`lit_lowrank.optim.guard`.

A rule with ``UpdateRule.lifts_only`` (GaLore's) changes a weight only by lifts
``W ← W − η α P N``, so the compute phase need not write, nor copy, the weight: its lifts are
recorded (:class:`DeferredLifts`) and written after every update was computed. Where the inner
optimizer also ``fails_only_out_of_memory`` (torch kernels only), the moment update moves there
too (:class:`LaterUpdates`): the moments are then advanced once, in place, instead of being
copied for an undo that such a step cannot need.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from torch import Tensor

from lit_lowrank.inner.base import InnerOptimizer
from lit_lowrank.optim.layouts import View
from lit_lowrank.optim.placement import LowRankSlot
from lit_lowrank.projectors.base import Projector
from lit_lowrank.rules.base import RuleInputs, UpdateRule


@dataclass
class LowRankUpdate:
    """One low-rank weight's update as the compute phase prepares it.

    Attributes:
        p: the parameter.
        target: the tensor written (``p``, or this rank's rows of it).
        view: ``target`` as the rule sees it (m×n, or E×m×n).
        slot: the weight's projector, schedule and placement.
        state: its optimizer state (moments).
        grad: ``G`` in the view's shape (None where only ``R`` was delivered).
        low: its projection ``R``.
        part: this rank's part of ``R`` (the moments' shape).
        lifts: whether the rule only lifts into it (it is written in the apply phase).
        moments_later: whether its moments are advanced in the apply phase too.
    """

    p: Tensor
    target: Tensor
    view: View
    slot: LowRankSlot
    state: dict
    grad: Tensor | None
    low: Tensor
    part: Tensor
    lifts: bool
    moments_later: bool

    def inputs(self, direction: Tensor) -> RuleInputs:
        """What the rule sees, with the direction ``N``."""
        return self.slot.rule_inputs(self.grad, self.low, direction, self.state)

    def apply_rule(self, rule: UpdateRule, inner: InnerOptimizer, direction: Tensor, step: int, lr: float,
                   decay: float, weight: Tensor) -> None:
        """``rule.apply_`` on ``weight`` (``target``, or a float copy of a stored one) with the
        direction ``N`` of step ``step``, inside decoupled decay ``λ`` (0 without)."""
        with decoupled_decay(weight, lr, decay, after=inner.decay_after_step):
            rule.apply_(self.view.weight(weight), self.inputs(direction), step_size=lr * inner.step_size_factor(step))


@dataclass
class LaterUpdates:
    """Low-rank updates of one group and step count whose moments are advanced in the apply
    phase: one ``inner.directions`` call over their ``R``, then the rule (``lifts_only``) on
    each weight in place, with decoupled decay ``λ`` (0 without) around it."""

    inner: InnerOptimizer
    rule: UpdateRule
    step: int
    lr: float
    decay: float
    updates: list[LowRankUpdate]

    def write(self) -> Iterator[Tensor]:
        """Advance the moments and write each weight, yielding its parameter once written."""
        directions = self.inner.directions([update.part for update in self.updates],
                                           [update.state for update in self.updates], self.step)
        for update, direction in zip(self.updates, directions):
            update.apply_rule(self.rule, self.inner, direction, self.step, self.lr, self.decay, update.target)
            yield update.p


class DeferredLifts:
    """A weight's projector as a rule with ``UpdateRule.lifts_only`` sees it in the compute phase:
    ``add_back_(weight, N, α)`` records the lift ``W += α · lift(N)`` with the bases as they are
    now, and :meth:`write` applies the recorded lifts in the apply phase (no copy of ``W``: if the
    step fails before, ``W`` was never written). Everything else, lifts into other tensors
    included, is the projector's own.

    Args:
        projector: the weight's projector as this rank applies it; one whose ``add_back_`` is
            :meth:`Projector.add_back_ <lit_lowrank.projectors.base.Projector.add_back_>`
            (``addmm_``/``baddbmm_`` with its bases), so that the lift is exact with bases held.
        weight: the tensor the rule is handed as ``param`` (the weight's view, m×n or E×m×n).
    """

    def __init__(self, projector: Any, weight: Tensor) -> None:
        self._projector, self.weight = projector, weight
        self._lifts: list[tuple[HeldBases, Tensor, float]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._projector, name)

    def add_back_(self, target: Tensor, low: Tensor, alpha: float) -> Tensor:
        if target is not self.weight:
            return self._projector.add_back_(target, low, alpha)
        self._lifts.append((HeldBases(*self._projector.bases()), low, alpha))
        return target

    def write(self) -> None:
        """Apply the recorded lifts to the weight, in order (``addmm_`` in place)."""
        for bases, low, alpha in self._lifts:
            bases.add_back_(self.weight, low, alpha)


class HeldBases:
    """Bases ``(L, Q)`` kept as a lift was recorded, applied as the base projector applies its own."""

    def __init__(self, left: Tensor | None, right: Tensor | None) -> None:
        self._bases = (left, right)

    def bases(self) -> tuple[Tensor | None, Tensor | None]:
        return self._bases

    add_back_ = Projector.add_back_


@contextmanager
def decoupled_decay(weight: Tensor, lr: float, decay: float, *, after: bool) -> Iterator[None]:
    """Decoupled weight decay around an update: ``W ← (1 − ηλ) W`` before it (torch's AdamW), or
    ``W ← W − ηλ W`` on the updated weight after it (``after``: HF ``transformers.AdamW``)."""
    if decay and not after:
        weight.mul_(1 - lr * decay)
    yield
    if decay and after:
        weight.add_(weight, alpha=-lr * decay)
