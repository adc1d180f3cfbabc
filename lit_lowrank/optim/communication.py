"""Low-rank gradient communication for DistributedDataParallel: all-reduce ``R`` instead of ``G``.

The GaLore rule steps with ``R = Pᵀ G`` (``side: std``, or ``G Q``) only. When every rank holds
the same basis ``P`` — they do under DDP: the same averaged gradients give the same SVD — the
projection is linear, so the average of the ranks' ``Rₖ = Pᵀ Gₖ`` *is* the projection of the
averaged gradient::

    mean_k(Pᵀ G_k) = Pᵀ mean_k(G_k)

A rank then sends ``r·max(m, n)`` numbers per target weight instead of ``m·n``. A parameter sends
its full gradient instead when its next step needs it
(:meth:`LowRankOptimizer.needs_full_gradient`): on the steps that refresh its subspace (the
projector fits the averaged ``G``), for dense parameters, and under rules that read ``G``
(Fira's residual, APOLLO's scaled gradient) — for those methods only the dense parameters'
traffic is unchanged and the targets' is too, so ``communication: lowrank`` saves nothing.

Plain PyTorch::

    ddp = DistributedDataParallel(model)
    optimizer = build_optimizer(model, rank=128, ...)
    ddp.register_comm_hook(LowRankCommunication(optimizer), lowrank_comm_hook)

The averaged ``R`` goes to the optimizer's next :meth:`~LowRankOptimizer.step` (through
:meth:`~LowRankOptimizer.receive_projections`), and ``p.grad`` holds its lift ``P R``, the
same on every rank. So anything that needs the full averaged gradient of a target weight
between backward and step — global-norm clipping, fp16 gradient unscaling — cannot be used with
it (the Lightning integrations refuse both).
"""

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lit_lowrank.optim.lowrank import LowRankOptimizer

# no `from __future__ import annotations`: DDP checks the hook's annotations as objects

COMMUNICATIONS = ("full", "lowrank")
"""``full``: every gradient is all-reduced (DDP's own hook); ``lowrank``: target weights send ``R``."""


class LowRankCommunication:
    """The state of :func:`lowrank_comm_hook` for one DDP model and its optimizer.

    Args:
        optimizer: the :class:`LowRankOptimizer` of the DDP model's parameters.
        process_group: the group to reduce over (default: the world, as DDP's).

    Attributes:
        sent_bytes: bytes this rank all-reduced in the last backward that communicated,
            ``{"lowrank": R of target weights, "full": full gradients}``; their sum is also set as
            the optimizer's ``comm_bytes`` (logged as ``optim/comm_bytes``).
    """

    def __init__(self, optimizer: LowRankOptimizer, process_group: Any = None) -> None:
        if not isinstance(optimizer, LowRankOptimizer):
            raise TypeError(f"low-rank communication needs a LowRankOptimizer, got {type(optimizer).__name__}")
        if optimizer.sharded:
            raise ValueError("low-rank communication is a DDP comm hook, and this optimizer's weights are sharded by "
                             "FSDP (which reduce-scatters their gradients itself)")
        self.optimizer = optimizer
        self.process_group = process_group
        self.sent_bytes = {"lowrank": 0, "full": 0}
        optimizer.comm_bytes = 0
        self._backward_done = True
        self._groups: dict[Tensor, dict[str, Any]] = {}

    def sends_projection(self, p: Tensor) -> bool:
        """Whether ``p`` sends ``R`` this step (the same answer on every rank: same state)."""
        group = self._groups.get(p)
        return group is not None and not self.optimizer.needs_full_gradient(p, group)

    def enter_bucket(self, last: bool) -> None:
        """Called by the hook for each bucket: at a backward's first, reset the counters and
        look up the param groups afresh (groups may have been added since)."""
        if self._backward_done:
            self.sent_bytes = {"lowrank": 0, "full": 0}
            self.optimizer.comm_bytes = 0
            self._groups = {p: group for group in self.optimizer.param_groups for p in group["params"]}
        self._backward_done = last

    def count(self, kind: str, tensor: Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        self.sent_bytes[kind] += size
        self.optimizer.comm_bytes += size


def lowrank_comm_hook(state: LowRankCommunication, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """A DDP communication hook (``ddp.register_comm_hook(state, lowrank_comm_hook)``).

    In one bucket, every parameter whose step can take ``R`` contributes ``R = project(G)``,
    the others their full gradient; both are divided by the world size and summed in one
    asynchronous all-reduce of their concatenation. On completion the full gradients are copied
    back into the bucket, each averaged ``R`` is handed to the optimizer and its lift written as
    the parameter's gradient.
    """
    state.enter_bucket(bucket.is_last())
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    grads, params = bucket.gradients(), bucket.parameters()
    low = {i: state.optimizer.project(params[i], grads[i]) for i in range(len(params))
           if state.sends_projection(params[i])}
    full = [grads[i] for i in range(len(params)) if i not in low]
    payload = torch.cat([g.reshape(-1) for g in full] + [r.reshape(-1) for r in low.values()]).div_(world)
    for g in full:
        state.count("full", g)
    for r in low.values():
        state.count("lowrank", r)

    def unpack(future: torch.futures.Future) -> Tensor:
        reduced = future.value()[0]
        offset, received = 0, {}
        for i, grad in enumerate(grads):
            if i in low:
                continue
            grad.copy_(reduced[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()
        for i, r in low.items():
            averaged = reduced[offset:offset + r.numel()].view_as(r).clone()
            offset += r.numel()
            received[params[i]] = averaged
            grads[i].copy_(state.optimizer.lift(params[i], averaged))
        state.optimizer.receive_projections(received)
        return bucket.buffer()

    work = dist.all_reduce(payload, group=group, async_op=True)
    return work.get_future().then(unpack)


def sync_module_states(module: torch.nn.Module, process_group: Any = None, src: int = 0) -> None:
    """Broadcast ``module``'s parameters and buffers from rank ``src``, as DDP does when it wraps a
    model: for layer-wise updates under data parallel, where the model is not wrapped."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor, src=src, group=process_group)
