"""The gradient seam: how a gradient that does not arrive as ``p.grad`` reaches a
:class:`~lit_lowrank.optim.lowrank.LowRankOptimizer`.

Three channels deliver a weight's gradient already projected, ``R`` (GaLore's ``Pᵀ G``), instead
of (or besides) ``p.grad``:

* the DDP communication hook (:mod:`lit_lowrank.optim.communication`) all-reduces ``R`` in
  place of ``G`` and hands over the average;
* layer-wise updates (:class:`~lit_lowrank.optim.layerwise.LayerwiseUpdates`) accumulate ``R``
  over micro-batches, average it over the ranks and step the weight inside backward
  (:meth:`~lit_lowrank.optim.lowrank.LowRankOptimizer.step_group`);
* CompAct's layers (:mod:`lit_lowrank.transforms.compact`) compute ``R`` from compressed
  activations and never form ``G``.

All three ask the same questions and deliver the same way, through :class:`GradientDelivery`,
which the optimizer inherits: :meth:`~GradientDelivery.needs_full_gradient` (may this step take
``R``?), :meth:`~GradientDelivery.project` / :meth:`~GradientDelivery.upcoming_bases` (the
basis to project on), :meth:`~GradientDelivery.receive` (hand ``R`` over) and
:meth:`~GradientDelivery.lift` (``P R``, for a hook that must leave a gradient in ``p.grad``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class GradientDelivery:
    """The optimizer's side of the gradient seam (see the module's docstring). Mixed into
    :class:`~lit_lowrank.optim.lowrank.LowRankOptimizer`, whose slots, state and groups it reads."""

    def needs_full_gradient(self, p: Tensor, group: dict[str, Any]) -> bool:
        """Whether ``p``'s next step needs its full gradient, not only its projection ``R``: a
        dense param, a rule that uses ``G`` (``UpdateRule.uses_gradient``: Fira, APOLLO), or a
        step that refreshes the subspace (always the first)."""
        if not group["lowrank"] or self._group_components(group)[1].uses_gradient:
            return True
        slot, state = self._slots.get(p), self.state.get(p, {})
        if slot is None or "step" not in state:
            return True
        return slot.schedule.should_refresh(int(state["step"]))

    def project(self, p: Tensor, grad: Tensor) -> Tensor:
        """``R``: ``grad`` (``p``'s shape) projected on ``p``'s current subspace (after its first step)."""
        slot = self._slots[p]
        return slot.projector.project(slot.view(grad))

    def upcoming_bases(self, p: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """The ``(L, Q)`` that the next step of ``p`` (a low-rank weight) will project with —
        after the refresh that step makes, if it makes one. Needs a projector that draws its basis
        without the gradient (``Projector.needs_gradient = False``: ``random``)."""
        slot = self._slots.get(p)
        if slot is None:  # before p's first step: find its group once
            group = next((g for g in self.param_groups if any(q is p for q in g["params"])), None)
            if group is None or not group["lowrank"]:
                raise ValueError(f"{self._name(p) if group else 'the parameter'} is not a low-rank weight of this "
                                 "optimizer")
            slot = self._slot(p, group)
        state = self.state.get(p, {})
        if not slot.schedule.should_refresh(int(state["step"]) if "step" in state else 0):
            return slot.projector.bases()
        return slot.projector.preview(shape_only(slot.view.shape, p))

    def receive(self, p: Tensor, low: Tensor, *, accumulate: bool = False) -> None:
        """The gradient seam: the one way a gradient reaches the optimizer other than ``p.grad``.

        ``low`` is ``R`` (r×n, m×r or r×r as the projector shapes it), ``p``'s gradient already
        projected on the basis of its coming step: :meth:`project` gives it, or the basis from
        :meth:`upcoming_bases`; a step that refreshes the subspace needs the full gradient
        instead (ask :meth:`needs_full_gradient` first). The next :meth:`step` — or
        :meth:`step_group` of ``p`` in layer-wise mode — uses it in place of projecting
        ``p.grad`` and steps ``p`` even without one; ``accumulate`` adds it to an ``R``
        received before (micro-batches). Dropped by :meth:`zero_grad`; kept for a retry if
        :meth:`step` fails. Its callers: the DDP communication hook (``R`` averaged over the
        ranks, :mod:`~lit_lowrank.optim.communication`), :class:`~lit_lowrank.optim.layerwise.LayerwiseUpdates`
        (``R`` accumulated and averaged per weight inside backward) and CompAct's layers (``R``
        from compressed activations, :mod:`~lit_lowrank.transforms.compact`)."""
        self._received[p] = self._received[p] + low if accumulate and p in self._received else low

    @property
    def received(self) -> frozenset[Tensor]:
        """The weights whose ``R`` came through :meth:`receive` for the next step."""
        return frozenset(self._received)

    def lift(self, p: Tensor, low: Tensor) -> Tensor:
        """``P R``: a projected gradient back in ``p``'s shape (after its first step)."""
        slot = self._slots[p]
        return slot.view.back(slot.projector.project_back(low), p)


def shape_only(shape: torch.Size, like: Tensor) -> Tensor:
    """A stand-in gradient of ``shape`` with ``like``'s dtype and device and no storage of its own
    (a broadcast scalar), for projectors that read only a gradient's shape."""
    return torch.zeros((), dtype=like.dtype, device=like.device).expand(shape)
