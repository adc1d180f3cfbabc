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
:meth:`~LowRankOptimizer.receive`, the optimizer's gradient seam), and ``p.grad`` holds its lift ``P R``, the
same on every rank. So anything that needs the full averaged gradient of a target weight
between backward and step — global-norm clipping, fp16 gradient unscaling — cannot be used with
it: the step refuses to read an ``R`` whose lift in ``p.grad`` was changed or cleared after
backward (``clip_grad_norm_`` and ``GradScaler`` change it in place), before updating anything
(the Lightning integrations refuse both at setup).

Gradient accumulation: communicate once per optimizer step, running the other micro-batches'
backward passes under ``ddp.no_sync()``. Without it every backward all-reduces, and the next
one projects ``p.grad = P R₁ + Gₖ`` again; that gives ``R₁ + Pᵀ Gₖ`` only for an orthonormal,
unquantized basis, so for any other (``galore-random``'s Gaussian sketch, an INT4 basis) the
step refuses it.
"""

import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lit_lowrank.optim.lowrank import LowRankOptimizer
from lit_lowrank.transforms.base import gradient_hidden, stored_weight

# no `from __future__ import annotations`: DDP checks the hook's annotations as objects

LIFT_SAMPLES = 64
"""Entries of each lift compared before a step reads ``R`` (cheap; a scaled gradient changes every one)."""

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

    The optimizer's :meth:`~torch.optim.Optimizer.step` (after its closure, if it gets one)
    raises ``RuntimeError``, before updating anything, where it would read a received ``R`` that
    no longer matches ``p.grad``: a lift changed or cleared after backward (gradient clipping,
    ``GradScaler``), or re-projected through a basis that is not orthonormal (several backward
    passes without ``no_sync``).

    Raises:
        ValueError: at construction, for an optimizer of FSDP-sharded weights, or one stepping
            weights whose transform hides their gradients (``compact``).
    """

    def __init__(self, optimizer: LowRankOptimizer, process_group: Any = None) -> None:
        if not isinstance(optimizer, LowRankOptimizer):
            raise TypeError(f"low-rank communication needs a LowRankOptimizer, got {type(optimizer).__name__}")
        if optimizer.sharded:
            raise ValueError("low-rank communication is a DDP comm hook, and this optimizer's weights are sharded by "
                             "FSDP (which reduce-scatters their gradients itself)")
        refuse_hidden_gradients(optimizer)
        if process_group is None:  # averaged over every rank: refresh_sharing auto may share
            optimizer.gradients_identical = True
        self.optimizer = optimizer
        self.process_group = process_group
        self.sent_bytes = {"lowrank": 0, "full": 0}
        optimizer.comm_bytes = 0
        self._backward_done = True
        self._groups: dict[Tensor, dict[str, Any]] = {}
        self._lifts: dict[Tensor, tuple[weakref.ref, int, Tensor]] = {}
        """For each weight handed an averaged ``R``: its ``p.grad`` as DDP left it (the lift), that
        tensor's version counter then (an in-place change bumps it: clipping) and a copy of a few
        of its entries (GradScaler's unscaling kernel changes them without bumping it)."""
        self._refusal: str | None = None
        """Why the next step must not read the received projections (set during backward)."""
        optimizer.register_step_pre_hook(self._before_step)
        optimizer.register_step_post_hook(self._after_step)

    def sends_projection(self, p: Tensor) -> bool:
        """Whether ``p`` sends ``R`` this step (the same answer on every rank: same state)."""
        group = self._groups.get(p)
        return group is not None and not self.optimizer.needs_full_gradient(p, group)

    def enter_bucket(self, last: bool) -> None:
        """Called by the hook for each bucket: at a backward's first, reset the counters, look
        up the param groups afresh (groups may have been added since), check an accumulation
        and have the lifts recorded once DDP has written them into ``p.grad``."""
        if self._backward_done:
            self.sent_bytes = {"lowrank": 0, "full": 0}
            self.optimizer.comm_bytes = 0
            self._groups = {p: group for group in self.optimizer.param_groups for p in group["params"]}
            self._refusal = self._inexact_accumulation()
            # DDP copies the reduced buckets into p.grad in an end-of-backward callback queued after
            # this one: this one queues the recording behind it
            queue_callback(lambda: queue_callback(self._record_lifts))
        self._backward_done = last

    def _inexact_accumulation(self) -> str | None:
        """Why this backward's projections would be wrong, if it is one more micro-batch of an
        accumulation (``R`` received and not yet stepped) whose lift cannot be re-projected exactly."""
        projectors = self.optimizer.projectors
        for p in self.optimizer.received:
            projector = projectors.get(p)
            if projector is not None and not reprojects_exactly(projector):
                return (f"{self.optimizer._name(p)} accumulates gradients over several backward passes that each "
                        f"communicated, and its basis ({type(projector).__name__}) is not orthonormal, so the "
                        "accumulated lift P·R in p.grad cannot be projected again exactly; nothing was updated. Use "
                        "`with model.no_sync():` for all but the last backward of each accumulation (or call "
                        "optimizer.zero_grad() before a backward whose gradients should replace the last ones)")
        return None

    def _record_lifts(self) -> None:
        self._lifts = {p: (weakref.ref(p.grad), p.grad._version, _sample(p.grad).clone())
                       for p in self.optimizer.received if p.grad is not None}

    def _changed_lift(self) -> Tensor | None:
        """A weight whose coming step reads its received ``R`` while ``p.grad`` is no longer the
        lift recorded after backward (cleared, replaced, changed in place), if any."""
        received = self.optimizer.received
        watched = [p for p in self._lifts if p in received]
        for p in watched:
            lift, version, _ = self._lifts[p]
            if p.grad is not lift() or p.grad._version != version:
                return p
        if not watched or _same([_sample(p.grad) for p in watched], [self._lifts[p][2] for p in watched]):
            return None  # one comparison for all (one device sync); then find the weight
        return next(p for p in watched if not _same([_sample(p.grad)], [self._lifts[p][2]]))

    def _before_step(self, optimizer: LowRankOptimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """The optimizer's step pre-hook (``args`` begin with the optimizer): refuse now, or after
        the closure (which runs backward)."""
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self.refuse_stale_projections()
            return None

        def checked_closure():
            loss = closure()
            self.refuse_stale_projections()
            return loss

        return args[:1], {**kwargs, "closure": checked_closure}

    def _after_step(self, optimizer: LowRankOptimizer, args: tuple, kwargs: dict) -> None:
        self._lifts, self._refusal = {}, None

    def refuse_stale_projections(self) -> None:
        """Raise if the coming step would read a received ``R`` that ``p.grad`` no longer lifts."""
        if self._refusal is not None:
            raise RuntimeError(self._refusal)
        changed = self._changed_lift()
        if changed is not None:
            raise RuntimeError(
                f"the gradient of {self.optimizer._name(changed)} was changed or cleared between backward and step() "
                "(torch.nn.utils.clip_grad_norm_, GradScaler.unscale_ or .step, ...), but under lowrank_comm_hook "
                "the step reads the averaged projection R that was communicated, not p.grad, and no rank ever "
                "holds the full averaged gradient: clipping and fp16 loss scaling cannot see the projected "
                "gradients. Nothing was updated. Train without them (bf16 autocast needs no GradScaler), or "
                "without the hook (DDP's own all-reduce, communication: full)")

    def count(self, kind: str, tensor: Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        self.sent_bytes[kind] += size
        self.optimizer.comm_bytes += size


def refuse_hidden_gradients(optimizer: LowRankOptimizer) -> None:
    """Refuse an optimizer stepping a weight whose transform hides its gradient (CompAct's layers
    hand it ``R`` in backward): the hook all-reduces gradients, and that weight has none, so its
    update would be this rank's own."""
    hidden = [optimizer._name(p) for group in optimizer.param_groups for p in group["params"] if gradient_hidden(p)]
    if hidden:
        raise ValueError(f"{hidden} are stepped without a .grad: a model transform that hides their gradients (the "
                         "'compact' transform's layers) hands the optimizer their R during backward, which "
                         "lowrank_comm_hook never sees, so no rank would average it. Train these weights in a single "
                         "process without DDP, or use a method without such a transform")


def _sample(grad: Tensor) -> Tensor:
    """About :data:`LIFT_SAMPLES` evenly spaced entries of ``grad`` (a view)."""
    return grad.reshape(-1)[::max(1, grad.numel() // LIFT_SAMPLES)]


def _same(tensors: list[Tensor], others: list[Tensor]) -> bool:
    """Whether the concatenations are equal entry by entry (NaN equal to NaN)."""
    return torch.allclose(torch.cat(tensors), torch.cat(others), rtol=0, atol=0, equal_nan=True)


def reprojects_exactly(projector: Any) -> bool:
    """Whether projecting a lift gives back what was lifted (``Pᵀ P R = R``): orthonormal bases,
    not stored quantized."""
    storage = getattr(projector, "_storage", None)
    return projector.orthonormal and getattr(storage, "quantizer", None) is None


def queue_callback(callback) -> None:
    """Run ``callback`` when the backward in progress ends, after the callbacks queued before it."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


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
        offset = 0
        for i, grad in enumerate(grads):
            if i in low:
                continue
            grad.copy_(reduced[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()
        for i, r in low.items():
            averaged = reduced[offset:offset + r.numel()].view_as(r).clone()
            offset += r.numel()
            grads[i].copy_(state.optimizer.lift(params[i], averaged))
            state.optimizer.receive(params[i], averaged)
        return bucket.buffer()

    work = dist.all_reduce(payload, group=group, async_op=True)
    return work.get_future().then(unpack)


def sync_module_states(module: torch.nn.Module, process_group: Any = None, src: int = 0) -> None:
    """Broadcast ``module``'s parameters and buffers from rank ``src``, as DDP does when it wraps a
    model: for layer-wise updates under data parallel, where the model is not wrapped. A weight
    stored in another format (INT8 weights) is synced through the buffers that store it; its
    parameter is a handle with no storage to write."""
    with torch.no_grad():
        params = [p for p in module.parameters() if stored_weight(p) is None]
        for tensor in [*params, *module.buffers()]:
            dist.broadcast(tensor, src=src, group=process_group)
