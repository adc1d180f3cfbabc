"""The UpdateRule contract: how the low-rank direction becomes a full-rank step (docs/plugins.md)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor

from lit_lowrank.projectors.base import Projector


@dataclass(frozen=True)
class RuleInputs:
    """What an update rule sees of one weight at one step.

    Attributes:
        grad: the gradient ``G`` (m×n); ``None`` for rules with ``uses_gradient = False`` when
            layer-wise accumulation summed projections instead of full gradients.
        low: its projection ``R`` (r×n, m×r or r×r).
        direction: the inner optimizer's output ``N`` (R's shape).
        projector: the weight's projector (its ``side`` says which axis was projected).
        state: the weight's optimizer state; rules may keep tensors here (they are checkpointed),
            copies, never ``grad``, ``low``, ``direction`` or views of them (they change or are
            freed after the step; ``check_update_rule`` refuses a rule that keeps one).
            ``state["step"]`` (a 0-dim float tensor) is the 1-based number of this step.
        reduce_grad: for a weight split by rows across ranks (FSDP), where ``grad`` and
            ``param`` are this rank's rows: sums a partial result over those rows (a squared
            norm) across the ranks, in place. None when this rank holds the whole weight.
        reduce_low: the same for ``low`` and ``direction`` when they are split by rows too (a
            right projection); None when they are whole on every rank.
    """

    grad: Tensor | None
    low: Tensor
    direction: Tensor
    projector: Projector
    state: dict[str, Tensor]
    reduce_grad: Callable[[Tensor], Tensor] | None = None
    reduce_low: Callable[[Tensor], Tensor] | None = None


class UpdateRule(ABC):
    """Applies ``W ← W − step_size · U`` where ``U`` is built from the gradient ``G`` (m×n), its
    projection ``R``, the inner optimizer's direction ``N`` (R's shape) and the projector.

    Built by the optimizer once per param group (rebuilt when its options change), offered
    ``scale`` and, where the group sets them, ``betas`` and ``eps`` (for a rule with moments of
    its own), each only if ``__init__`` accepts it; the user's ``rule_args`` come on top.

    Args:
        scale: the papers' α, multiplying the lifted low-rank update.

    ``uses_gradient`` says whether :meth:`apply_` reads the full gradient ``G``; a rule that
    needs only ``R`` and ``N`` sets it False, and then gets ``grad=None`` when layer-wise
    gradient accumulation sums projections instead of full gradients.
    """

    uses_gradient: bool = True
    any_projection: bool = False
    """Whether :meth:`apply_` works with any projection — it only lifts through
    ``projector.add_back_``/``project_back``, never reads the projector's ``side`` — so tensor
    projectors (Tucker) may be used with it."""
    batched: bool = False
    """Whether :meth:`apply_` takes a stack of E matrices (E×m×n weights, the ``experts``
    layout) and treats each slice as its own weight; the optimizer refuses stacks otherwise."""
    shardable: bool = False
    """Whether :meth:`apply_` is right on one rank's rows of a weight that FSDP split by rows: it
    lifts only through the projector, and sums every norm over ``G``- and ``R``-shaped tensors
    across the ranks through ``inputs.reduce_grad`` and ``inputs.reduce_low``; the optimizer
    refuses sharded weights otherwise."""
    lifts_only: bool = False
    """Whether :meth:`apply_` changes ``param`` only by ``inputs.projector.add_back_(param, …)``
    and never reads ``param``, and raises nothing on valid inputs: the optimizer then writes its
    lifts last, so that a failed step is undone without copying the weight — with an inner
    optimizer that ``fails_only_out_of_memory``, it runs :meth:`apply_` itself in the step's apply
    phase, after the moments are advanced there (:mod:`lit_lowrank.optim.deferred`); otherwise
    the weight is copied before :meth:`apply_`."""
    required_rank: int | None = None
    """The one subspace rank the rule works at (APOLLO-Mini: 1), or None for any; the optimizer
    refuses another rank when it is built."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    @abstractmethod
    def apply_(self, param: Tensor, inputs: RuleInputs, *, step_size: float) -> None:
        """Update ``param`` in place."""

    def state_layout(self, grad: Tensor, low: Tensor, projector: Projector) -> dict[str, Any]:
        """The tensors :meth:`apply_` keeps in a weight's state, shaped and typed as it makes them
        (their values unused), for a gradient shaped like ``grad`` (``G``, the view's shape) and
        its projection ``low`` (``R``) — both on the ``meta`` device, ``projector`` refreshed with
        ``grad``. The memory prediction (:mod:`lit_lowrank.optim.summary`, the estimator) counts
        them as :meth:`LowRankOptimizer.state_bytes` counts the real ones; none by default, so a
        rule that keeps tensors overrides it."""
        return {}
