"""Where a parameter lives: the one object that knows how a deployment holds each weight.

Every parameter of a :class:`~lit_lowrank.optim.lowrank.LowRankOptimizer`, low-rank or dense,
gets one placement when its group is admitted:

* :data:`WHOLE` (:class:`WholeWeight`) — the weight is held whole on this rank: one process,
  plain DDP, layer-wise DDP. Its tensors are the parameter's own, the whole gradient is
  ``p.grad``, nothing is reduced over ranks.
* :class:`RowsOfWeight` — this rank's rows I_i of a weight that FSDP2 (or HSDP) splits by rows
  (:class:`~lit_lowrank.optim.sharding.RowShard`): local tensors are the DTensors' local parts,
  the whole gradient G is gathered from the ranks (on every rank, or on one owner under refresh
  sharing), the projector is applied to the rank's rows
  (:class:`~lit_lowrank.optim.sharding.LocalRows`), the moments cover a split of R, norms and
  counts are summed or agreed over the ranks, and state tensors go out as DTensors of the whole
  on save and come back as this rank's block on load (README 'Scaling out';
  :mod:`lit_lowrank.optim.sharding` has the equations).

The optimizer's step asks the placement for each of these and reads the same for every
deployment. :class:`LowRankSlot` is a low-rank weight's per-weight objects with its placement.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from lit_lowrank.optim.layouts import View
from lit_lowrank.optim.sharding import LocalRows, RowShard, local, map_tensors
from lit_lowrank.projectors.base import Projector, Side
from lit_lowrank.rules.base import RuleInputs
from lit_lowrank.schedules.base import Schedule

StateSplit = tuple[int, int]
"""The axis along which a weight's state tensors are split over the ranks, and its full length."""


class WholeWeight:
    """A weight held whole on this rank (one process, DDP): every question answers with the
    parameter's own tensors; nothing is gathered, split or reduced."""

    sharded = False
    joins_gathers = False
    """Whether this rank must take part in gathering the gradient even for a refresh another
    rank computes (a collective): no, nothing is gathered."""
    identical_gradients = False
    """Whether the gradient a step reads is known to be the same on every rank by placement
    alone (it is for rows gathered from FSDP's reduce-scatter); a whole weight's may differ."""
    sent = 0
    """Bytes this placement's collectives sent: none."""

    def local(self, tensor: Tensor | None) -> Tensor | None:
        """The part of a parameter, gradient or received ``R`` this rank holds: all of it."""
        return tensor

    def applied(self, projector: Projector, stacked: bool) -> Projector:
        """The projector as this rank applies it: itself."""
        return projector

    def local_view(self, view: View, tensor: Tensor) -> View:
        """The view of this rank's part of the weight: the weight's own."""
        return view

    def reads_gradient(self, projector: Projector) -> bool:
        """Whether a refresh gets the gradient's values (else a shape-only stand-in): always, as
        the whole gradient is at hand."""
        return True

    def whole_gradient(self, grad: Tensor, owner: int | None) -> Tensor | None:
        """The whole gradient (m×n rows) of which ``grad`` is this rank's part: ``grad`` itself
        (``owner``, the rank of a shared refresh, asks nothing here: only the owner calls)."""
        return grad

    def state_part(self, low: Tensor, applied: Projector) -> Tensor:
        """The part of ``R`` this rank keeps moments for: all of it."""
        return low

    def rule_inputs(self, grad: Tensor | None, low: Tensor, direction: Tensor, applied: Projector,
                    state: dict) -> RuleInputs:
        """What the rule sees: the weight's ``G``, ``R``, ``N`` and projector, norms its own."""
        return RuleInputs(grad, low, direction, applied, state)

    def state_split(self, view: View, projector: Projector, stacked: bool) -> StateSplit | None:
        """How the state tensors are split over the ranks: not at all."""
        return None

    def distributed(self, state: dict[str, Any], split: StateSplit | None) -> dict[str, Any]:
        """The state as a checkpoint holds it: as it is."""
        return state

    def localized(self, state: dict[str, Any], split: StateSplit | None) -> dict[str, Any]:
        """Saved state as this rank keeps it: as it is."""
        return state

    def least(self, value: int) -> int:
        """The smallest of the ranks' ``value``: this rank's own."""
        return value


WHOLE = WholeWeight()
"""The placement of every weight held whole (it holds nothing of its own)."""


class RowsOfWeight:
    """This rank's rows of a weight FSDP2/HSDP splits by rows (Shard(0)): wraps its
    :class:`~lit_lowrank.optim.sharding.RowShard`, whose collectives (over the mesh dimension
    that splits the rows) do the gathers and reductions; ``sent`` counts their bytes."""

    sharded = True
    joins_gathers = True
    identical_gradients = True

    def __init__(self, shard: RowShard) -> None:
        self.shard = shard

    @property
    def mesh(self) -> Any:
        return self.shard.mesh

    @property
    def sent(self) -> int:
        return self.shard.sent

    def local(self, tensor: Tensor | None) -> Tensor | None:
        """This rank's rows of a DTensor (sharing its storage); a plain tensor as it is."""
        return local(tensor)

    def applied(self, projector: Projector, stacked: bool) -> LocalRows:
        """The projector cut to this rank's rows (or experts, ``stacked``): :class:`LocalRows`."""
        return LocalRows(projector, self.shard, stacked)

    def local_view(self, view: View, tensor: Tensor) -> View:
        """The view of this rank's rows or experts (``tensor``: its local part)."""
        return View(torch.Size((tensor.shape[0], *view.shape[1:])))

    def reads_gradient(self, projector: Projector) -> bool:
        """Whether a refresh gathers the gradient's values: only for a projector that reads them
        (``random`` draws its basis from a seed and G's shape: nothing is gathered)."""
        return projector.needs_gradient

    def whole_gradient(self, grad: Tensor, owner: int | None) -> Tensor | None:
        """The whole G from the ranks' row blocks ``grad``: all-gathered to every rank, or, for
        a shared refresh, gathered on global rank ``owner`` only (None elsewhere)."""
        rows = self.shard.shape[0]
        return self.shard.gather(grad, 0, rows) if owner is None else self.shard.gather_to(grad, rows, owner)

    def state_part(self, low: Tensor, applied: LocalRows) -> Tensor:
        """The part of ``R`` this rank keeps moments for: its rows or experts where R is split
        like G, else (R whole on every rank: left, both) its block J_i of R's columns."""
        if applied.low_split:
            return low
        return low[..., self.shard.columns(low.shape[-1])].contiguous()  # torch's fused Adam takes dense tensors

    def rule_inputs(self, grad: Tensor | None, low: Tensor, direction: Tensor, applied: LocalRows,
                    state: dict) -> RuleInputs:
        """What the rule sees: this rank's rows of ``G``; for a matrix the whole direction ``N``
        (all-gathered from the ranks' column blocks when R is whole) and the sums over the
        ranks; for a stack, this rank's whole experts (their norms are their own)."""
        if applied.stacked:
            return RuleInputs(grad, low, direction, applied, state)
        if not applied.low_split:
            direction = self.shard.gather(direction, -1, low.shape[-1])
        total = self.shard.total
        return RuleInputs(grad, low, direction, applied, state, total, total if applied.low_split else None)

    def state_split(self, view: View, projector: Projector, stacked: bool) -> StateSplit:
        """The axis along which the moments are split over the ranks and its full length: the
        experts E of a stack, R's m rows for a right projection, else its n (left) or r (both)
        columns."""
        if stacked or projector.side == Side.RIGHT:
            return 0, view.shape[0]
        right = projector.bases()[1]
        return -1, view.shape[-1] if right is None else right.shape[-1]

    def distributed(self, state: dict[str, Any], split: StateSplit) -> dict[str, Any]:
        """Each state tensor (this rank's block along ``split``) as a DTensor of the whole, so
        that torch's distributed checkpoint saves every rank's part."""
        return map_tensors(state, lambda part: self.shard.distributed(part, *split))

    def localized(self, state: dict[str, Any], split: StateSplit) -> dict[str, Any]:
        """This rank's block along ``split`` of each saved state tensor (a DTensor of the whole,
        with any placement, or a plain tensor of the whole)."""
        return map_tensors(state, lambda value: self.shard.localize(value, *split))

    def least(self, value: int) -> int:
        """The smallest of the ranks' ``value`` (the first offender any rank found)."""
        return self.shard.least(value)


Placement = WholeWeight | RowsOfWeight


def placement_of(p: Tensor, shards: dict[Tensor, RowShard]) -> Placement:
    """``p``'s placement, given the row shards its group's validation found."""
    shard = shards.get(p)
    return WHOLE if shard is None else RowsOfWeight(shard)


class Placements(dict):
    """Every parameter's placement, by parameter, with what concerns them all: one mesh, the
    agreement of the ranks, the bytes their collectives sent. The placements of rows split over
    ranks are also kept apart (:attr:`rows`), so that a step's questions about them all do not
    scan every parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[Tensor, RowsOfWeight] = {}

    @property
    def sharded(self) -> bool:
        """Whether some parameters are split by rows across ranks."""
        return bool(self.rows)

    def admit(self, found: dict[Tensor, Placement]) -> None:
        """Add a group's placements, refusing rows split over another device mesh than the others'."""
        rows = {p: placement for p, placement in found.items() if placement.sharded}
        meshes = [placement.mesh for placement in (*self.rows.values(), *rows.values())]
        if any(mesh != meshes[0] for mesh in meshes):
            raise ValueError("the parameters are sharded over different device meshes; shard every module with "
                             "fully_shard over the same mesh")
        self.update(found)
        self.rows.update(rows)

    def pop(self, p: Tensor, default: Any = None) -> Placement | None:
        self.rows.pop(p, None)
        return super().pop(p, default)

    def whole_beside_rows(self) -> Tensor | None:
        """A parameter held whole while others are split by rows (nothing would average its
        gradient over the ranks), if any."""
        if not self.sharded:
            return None
        return next((p for p, placement in self.items() if not placement.sharded), None)

    def agreed(self, bad: int | None, count: int) -> int | None:
        """The first offender's index among ``count`` checked tensors: this rank's ``bad``, or,
        for weights split over ranks (each checked its own rows), the first any rank found."""
        agreement = next(iter(self.rows.values()), WHOLE)
        found = agreement.least(count if bad is None else bad)
        return None if found == count else found

    def sent(self) -> int:
        """Bytes the placements' collectives sent so far."""
        return sum(placement.sent for placement in self.rows.values())


@dataclass
class LowRankSlot:
    """The per-weight objects that are not plain tensors (saved through their state dicts), the
    view of the weight its components see (its matricization, for a conv kernel), and the
    weight's :data:`Placement`."""

    projector: Projector
    schedule: Schedule
    view: View
    placement: Placement = WHOLE
    warned_reshape: bool = False
    """Whether the user was told that this weight's moments were reset for a basis of another shape."""

    @property
    def stacked(self) -> bool:
        """Whether the weight is a stack of experts (E×m×n)."""
        return len(self.view.shape) == 3

    @cached_property
    def applied(self) -> Projector | LocalRows:
        """The projector as this rank applies it (:meth:`WholeWeight.applied`); made once per
        weight, as it reads the projector's current bases at each use."""
        return self.placement.applied(self.projector, self.stacked)

    def local_view(self, tensor: Tensor) -> View:
        """The view of this rank's part of the weight (``tensor``: its local rows or experts)."""
        return self.placement.local_view(self.view, tensor)

    def state_split(self) -> StateSplit | None:
        """How the weight's moments are split over the ranks (:meth:`RowsOfWeight.state_split`)."""
        return self.placement.state_split(self.view, self.projector, self.stacked)

    def state_part(self, low: Tensor) -> Tensor:
        """The part of ``R`` this rank keeps moments for."""
        return self.placement.state_part(low, self.applied)

    def rule_inputs(self, grad: Tensor | None, low: Tensor, direction: Tensor, state: dict) -> RuleInputs:
        """What the rule sees of this weight on this rank."""
        return self.placement.rule_inputs(grad, low, direction, self.applied, state)

    def whole_gradient(self, grad: Tensor, owner: int | None = None) -> Tensor | None:
        """The whole G in the view's shape from this rank's part ``grad`` (None on a rank other
        than ``owner`` of a shared refresh of rows)."""
        whole = self.placement.whole_gradient(grad, owner)
        return None if whole is None else self.view(whole)
