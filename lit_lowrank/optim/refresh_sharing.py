"""Refresh work shared across ranks: each weight's subspace refresh computed by one rank, its
projector's state broadcast to the others.

Under data parallelism every rank refreshes its projectors from the same gradient — DDP's
averaged ``G``, or under FSDP2 the ``G`` gathered from the row shards — so every rank computes
the same SVDs. With sharing, the weights due for a refresh are assigned to the ranks by their
cost m·n (:func:`owners`: the largest first, each to the least loaded rank, the same on every
rank), the owner refreshes, and its projector's whole state (bases, side, refresh counter, any
generator state: ``Projector.state_dict()``) is broadcast to the others, which load it — r·m
numbers per weight instead of the SVD of m×n. Every rank then holds bitwise the projector it
would have computed itself, so the trained weights are bitwise those without sharing.

The option ``refresh_sharing`` (a group option of ``LowRankOptimizer``):

* ``auto`` (default) — shared when ``torch.distributed`` is initialized with more than one rank
  and the optimizer knows the gradients are the same on every rank: weights sharded by FSDP2
  (the gathered ``G``), or an optimizer whose ``gradients_identical`` is set — by the
  ``ddp_lowrank`` strategy, :class:`~lit_lowrank.optim.communication.LowRankCommunication` and
  layer-wise DDP, which average the gradients themselves;
* ``on`` — shared whenever there is more than one rank: plain torch DDP, where the optimizer
  cannot know that the gradients were averaged (set it only then: ranks with different
  gradients would all take the owner's basis);
* ``off`` — every rank refreshes every weight.

Not shared, whatever the option: layer-wise steps (``LowRankOptimizer.step_group``, taken inside
backward while other weights' all-reduces are in flight: a collective of the step's own would
interleave with them differently on each rank), projectors that read no gradient values (``random``: each
rank draws the same basis from a seed) and projectors that share a rank budget through the
optimizer's ledger (``adaptive-rank``: a weight's grant depends on the grants made before it in
the same step, on every rank). A refresh that fails on its owner (an SVD that does not
converge) is raised on every rank, after every rank's refreshes of the step are rolled back.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lit_lowrank.projectors.base import Projector

REFRESH_SHARING = ("auto", "on", "off")


def check_refresh_sharing_option(value: Any) -> None:
    if value not in REFRESH_SHARING:
        raise ValueError(f"refresh_sharing={value!r}; expected one of {REFRESH_SHARING} (on: plain DDP, whose "
                         "averaged gradients the optimizer cannot see; auto: the lit_lowrank strategies and FSDP2)")


def world_size() -> int:
    """The number of ranks of the default process group (1 without ``torch.distributed``)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def shareable(projector: Projector) -> bool:
    """Whether a projector's refresh can be computed on one rank and its state sent to the
    others: it reads the gradient's values, and takes no shared rank budget (``ledger``)."""
    return projector.needs_gradient and "ledger" not in inspect.signature(type(projector)).parameters


def owners(costs: list[int], ranks: int) -> list[int]:
    """The rank that refreshes each weight, given each weight's cost: the largest first (ties:
    the lower index), each to the rank with the least cost so far (ties: the lower rank)."""
    load, assigned = [0] * ranks, [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        assigned[index] = rank
        load[rank] += costs[index]
    return assigned


def skeleton(tree: Any) -> Any:
    """``tree`` (a state dict, possibly nested) with each tensor replaced by its shape, dtype
    and device: what a receiving rank needs to rebuild it from bytes."""
    if isinstance(tree, dict):
        return {key: skeleton(value) for key, value in tree.items()}
    if isinstance(tree, Tensor):
        return ("tensor", tuple(tree.shape), tree.dtype, str(tree.device))
    return tree


def tensors_of(tree: Any) -> list[Tensor]:
    """The tensors of a (nested) state dict, in its order."""
    if isinstance(tree, dict):
        return [t for value in tree.values() for t in tensors_of(value)]
    return [tree] if isinstance(tree, Tensor) else []


def as_bytes(tensors: list[Tensor], device: torch.device) -> Tensor:
    """The tensors' raw bytes, concatenated into one uint8 tensor on ``device``."""
    parts = [t.detach().contiguous().reshape(-1).view(torch.uint8).to(device) for t in tensors if t.numel()]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8, device=device)


def rebuilt(shape: Any, data: Tensor, offset: int) -> tuple[Any, int]:
    """The state dict whose :func:`skeleton` is ``shape``, its tensors cut from ``data`` (bytes)
    from ``offset`` on; and the offset after them."""
    if isinstance(shape, dict):
        tree = {}
        for key, value in shape.items():
            tree[key], offset = rebuilt(value, data, offset)
        return tree, offset
    if not (isinstance(shape, tuple) and len(shape) == 4 and shape[0] == "tensor"):
        return shape, offset
    _, size, dtype, device = shape
    empty = torch.empty(size, dtype=dtype)
    length = empty.numel() * empty.element_size()
    chunk = data[offset:offset + length].to("cpu").clone()  # a copy of its own: aligned for any dtype
    return chunk.view(dtype).reshape(size).to(device), offset + length


class SharedRefresh:
    """One step's refreshes of shared weights: which this rank computes (:meth:`mine`), what
    failed here (:meth:`failed`), and the exchange that hands every rank every refreshed
    projector's state (:meth:`exchange`).

    Args:
        projectors: the projectors due for a shared refresh this step, in the same order on
            every rank (the optimizer's parameter order).
        costs: each one's refresh cost (m·n of its gradient).
        device: where the bytes travel (the parameters' device: CUDA under NCCL).
    """

    def __init__(self, projectors: list[Projector], costs: list[int], device: torch.device) -> None:
        self.projectors, self.device = projectors, device
        self.rank, self.ranks = dist.get_rank(), dist.get_world_size()
        self.owner = owners(costs, self.ranks)
        self.error: BaseException | None = None
        self.sent = 0
        """Bytes of the projector states broadcast (this rank's sent, the others' received): each
        broadcast's payload, as ``comm_bytes`` counts an all-reduce's; the gather of the shapes
        (pickled descriptions, not tensors) is not counted."""

    def mine(self, index: int) -> bool:
        """Whether this rank refreshes the ``index``-th projector (and nothing failed here yet)."""
        return self.owner[index] == self.rank and self.error is None

    def failed(self, error: BaseException) -> None:
        """Keep the first error of this rank's refreshes, raised on every rank by :meth:`exchange`."""
        self.error = self.error or error

    def exchange(self) -> None:
        """Send each owned projector's state, load the others': one gather of each rank's
        shapes (or its error), then one broadcast of each rank's bytes. Raises the first
        owner's error on every rank instead (nothing loaded)."""
        owned = [i for i, owner in enumerate(self.owner) if owner == self.rank]
        states = {} if self.error else {i: self.projectors[i].state_dict() for i in owned}
        report = ("error", self.error) if self.error else ("ok", {i: skeleton(s) for i, s in states.items()})
        reports: list[Any] = [None] * self.ranks
        dist.all_gather_object(reports, report)
        error = next((found for kind, found in reports if kind == "error"), None)
        if error is not None:
            raise error
        for source, (_, shapes) in enumerate(reports):
            self._receive(source, shapes, states)

    def _receive(self, source: int, shapes: dict[int, Any], states: dict[int, dict]) -> None:
        """Broadcast ``source``'s projector states (their bytes) and load them here."""
        if not shapes:
            return
        if source == self.rank:
            data = as_bytes([t for i in shapes for t in tensors_of(states[i])], self.device)
        else:
            length = sum(torch.empty(s[1], dtype=s[2]).nbytes for i in shapes for s in _leaves(shapes[i]))
            data = torch.empty(length, dtype=torch.uint8, device=self.device)
        dist.broadcast(data, src=source)
        self.sent += data.numel()  # uint8: one byte each
        if source == self.rank:
            return
        offset = 0
        for index, shape in shapes.items():
            state, offset = rebuilt(shape, data, offset)
            self.projectors[index].load_state_dict(state)


def _leaves(shape: Any) -> list[tuple]:
    """The tensor descriptions of a :func:`skeleton`, in its order."""
    if isinstance(shape, dict):
        return [leaf for value in shape.values() for leaf in _leaves(value)]
    return [shape] if isinstance(shape, tuple) and len(shape) == 4 and shape[0] == "tensor" else []


def shares_refresh(group: dict[str, Any], projector: Projector, identical: bool) -> bool:
    """Whether a weight's refresh is computed by one rank and sent to the others, given its
    group's ``refresh_sharing``, its projector and whether its gradient is known to be the same
    on every rank (``identical``: gathered rows of an FSDP2 weight, or averaged by the
    optimizer's own communication): see the module's docstring for when ``auto`` shares."""
    mode = group.get("refresh_sharing", "auto")
    if mode == "off" or world_size() < 2 or not shareable(projector):
        return False
    return mode == "on" or identical
