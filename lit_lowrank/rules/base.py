"""The UpdateRule contract: how the low-rank direction becomes a full-rank step (DESIGN.md §2)."""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor

from lit_lowrank.projectors.base import Projector


class UpdateRule(ABC):
    """Applies ``W ← W − step_size · U`` where ``U`` is built from the gradient ``G`` (m×n), its
    projection ``R``, the inner optimizer's direction ``N`` (R's shape) and the projector.

    Args:
        scale: the papers' α, multiplying the lifted low-rank update.

    Rules may keep per-parameter tensors in ``state`` (the optimizer state of that weight).
    ``uses_gradient`` says whether :meth:`apply_` reads the full gradient ``G``; a rule that
    needs only ``R`` and ``N`` sets it False, and then gets ``grad=None`` when layer-wise
    gradient accumulation sums projections instead of full gradients.
    """

    uses_gradient: bool = True

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    @abstractmethod
    def apply_(
        self,
        param: Tensor,
        grad: Tensor,
        low: Tensor,
        direction: Tensor,
        projector: Projector,
        state: dict[str, Tensor],
        *,
        step_size: float,
    ) -> None:
        """Update ``param`` in place."""
