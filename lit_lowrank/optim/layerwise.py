"""Layer-wise updates (optimizer-in-backward): each parameter is stepped inside its
``register_post_accumulate_grad_hook`` during ``backward()`` and its gradient freed at once, so
the whole model's gradients never coexist (GaLore §4.3 "per-layer weight updates", after LOMO,
Lv et al. 2023). Peak memory during backward falls by about the size of the gradients.

Gradient accumulation, which galore-torch's layer-wise mode cannot do: over the k micro-batches
of one optimizer step, a low-rank weight keeps only ``R_acc = Σᵢ Pᵀ Gᵢ`` — ``r·max(m, n)``
numbers with ``side: std`` — and frees every ``Gᵢ``. The projection is linear, so ``R_acc``
equals ``Pᵀ Σᵢ Gᵢ``, the projection the standard mode takes of the accumulated gradient, and the
trajectory is the same up to the order of floating-point sums. Three kinds of parameter keep
accumulating the full gradient in ``p.grad`` until the window's last micro-batch instead:

* low-rank weights whose coming step refreshes the subspace (the projector fits the full ``G``;
  with GaLore's T = 200 that is one window in 200);
* weights under a rule that reads ``G`` (``UpdateRule.uses_gradient``: Fira's residual,
  APOLLO's scaled gradient) — correct, but without the accumulation memory saving;
* dense parameters (embeddings, norms, heads): their AdamW step needs the full gradient.

Non-finite gradients (the optimizer's ``nonfinite`` policy) are checked per parameter, as each
one is stepped — the step's other gradients do not exist yet or are already gone. With ``skip``
a parameter whose gradient (or accumulated ``R_acc``) holds NaN/inf keeps its weight, moments
and projector, is counted in ``skipped_steps`` and named in a warning, while the others are
updated; ``raise`` raises from ``backward()``, after the parameters stepped before it. So the
guarantee is per parameter: no non-finite value enters any state, but one step can update some
parameters and skip others.

Data parallel (``torch.distributed`` initialized with more than one process): the hooks reduce
each gradient themselves, in place of DDP (do not wrap the model in DistributedDataParallel: it
would all-reduce after the hooks stepped; start every rank from the same weights instead,
e.g. with :func:`~lit_lowrank.optim.communication.sync_module_states`). On the window's last
micro-batch, a parameter launches an asynchronous all-reduce of what its step needs — ``R_acc + R``
where the step can take ``R`` and ``communication="lowrank"``, else its full gradient — and is
stepped when it arrives, in launch order, while backward goes on (the payload's memory is freed
right after that step, by the stepping thread); the end of backward waits for the rest. Every rank issues the same all-reduces in the same order, so a parameter that gets a
gradient in a window on some ranks must get one on all of them (DDP's ``find_unused_parameters``
has no counterpart): at the first gradient of a window's last backward, before any all-reduce of
it, the ranks sum one "has a gradient this window" flag per parameter (the autograd engine tells
which parameters the backward in progress will reach), and every rank raises ``RuntimeError``
naming the parameters that some ranks lack — nothing of that step is updated. A parameter
unused on every rank is skipped, as before.

Not supported, by construction: global gradient-norm clipping (no per-parameter equivalent —
every other gradient is already gone when one parameter steps) and gradient scaling for fp16
(the scaler unscales ``p.grad`` after backward).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.graph import get_gradient_edge
from torch.utils.hooks import RemovableHandle

from lit_lowrank.optim.communication import COMMUNICATIONS
from lit_lowrank.optim.lowrank import LowRankOptimizer
from lit_lowrank.transforms.base import gradient_hidden


class LayerwiseUpdates:
    """Runs ``optimizer``'s steps inside ``backward()``, one parameter at a time.

    Plain PyTorch::

        optimizer = build_optimizer(model, rank=128, ...)
        layerwise = LayerwiseUpdates(optimizer, accumulation=4).attach()
        for i, batch in enumerate(loader):
            (loss_fn(model, batch) / 4).backward()  # every 4th backward steps each weight inside it
            if (i + 1) % 4 == 0:
                optimizer.step()   # a no-op (no gradient is left); keeps the scheduler's order check quiet
                scheduler.step()   # per optimizer step, as usual

    Args:
        optimizer: the :class:`LowRankOptimizer` whose parameters are updated.
        accumulation: backward passes (micro-batches) per optimizer step. The window's last
            backward steps the parameters; set :attr:`final` before a backward to decide it
            explicitly instead of counting (Lightning ends a window at an epoch's last batch).
        process_group: the ranks to average gradients over; default: all of them when
            ``torch.distributed`` is initialized with several processes, else none.
        communication: under data parallel, ``lowrank`` all-reduces ``R`` for the steps that
            take it, ``full`` every full gradient.
        bucket_cap_mb: all-reduces in flight above this size are waited for before the next
            one starts (bounds the full gradients held for communication, as DDP's buckets do).

    The optimizer's own :meth:`~torch.optim.Optimizer.step` becomes a no-op (no parameter holds
    a gradient afterwards), so loops and frameworks that still call it behave.
    """

    def __init__(self, optimizer: LowRankOptimizer, accumulation: int = 1, *, process_group: Any = None,
                 communication: str = "lowrank", bucket_cap_mb: float = 25.0) -> None:
        if not isinstance(optimizer, LowRankOptimizer):
            raise TypeError(f"layer-wise updates need a LowRankOptimizer, got {type(optimizer).__name__}")
        if optimizer.sharded:
            raise ValueError("layer-wise updates reduce and step whole gradients inside backward, and this optimizer's "
                             "weights are sharded by FSDP; use DDP for layer-wise mode (strategy 'ddp_lowrank')")
        if accumulation < 1:
            raise ValueError(f"accumulation must be >= 1 micro-batch, got {accumulation}")
        if communication not in COMMUNICATIONS:
            raise ValueError(f"communication={communication!r}; expected one of {COMMUNICATIONS}")
        if bucket_cap_mb <= 0:
            raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb}")
        self.optimizer = optimizer
        self.accumulation = accumulation
        self.process_group = process_group
        self.communication = communication
        self._cap_bytes = int(bucket_cap_mb * 2**20)
        self._world = _world_size(process_group)
        self._in_flight: deque[tuple[Tensor, Tensor | None, Tensor, Any]] = deque()  # (p, R or None, payload, work)
        self._sent = 0
        if self._world > 1:
            optimizer.comm_bytes = 0
        self.micro_batch = 0
        """Backward passes done in the current window."""
        self.final: bool | None = None
        """Whether the next backward ends the window (None: count to ``accumulation``)."""
        self._lows: dict[Tensor, Tensor] = {}
        self._pending: dict[Tensor, None] = {}  # params with a gradient or R_acc not yet stepped (ordered)
        self._handles: list[RemovableHandle] = []
        self._groups: dict[Tensor, dict[str, Any]] = {}
        self._end_queued = False

    # ------------------------------------------------------------------ hooks
    def attach(self) -> LayerwiseUpdates:
        """Register the per-parameter hooks (idempotent); returns ``self``."""
        if not self._handles:
            if any(gradient_hidden(p) for g in self.optimizer.param_groups for p in g["params"]):
                raise ValueError("CompAct layers hand R to optimizer.step() and their weights never get a .grad, "
                                 "so layer-wise hooks would never step them; use one or the other")
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if p.requires_grad:
                        self._groups[p] = group
                        self._handles.append(p.register_post_accumulate_grad_hook(self._on_gradient))
        return self

    def detach(self) -> None:
        """Remove the hooks; an unfinished window's accumulated gradients are dropped."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._groups.clear()
        self.reset_window()

    def reset_window(self) -> None:
        """Drop what the current window accumulated (``R_acc`` and kept gradients)."""
        for _, _, _, work in self._in_flight:
            work.wait()  # a collective cannot be taken back: let it finish, then drop its result
        self._in_flight.clear()
        self._sent = 0
        for p in self._pending:
            p.grad = None
        self._lows.clear()
        self._pending.clear()
        self.micro_batch = 0
        self.final = None
        self._end_queued = False

    def ends_window(self) -> bool:
        """Whether the backward in progress (or the next one) steps the parameters."""
        return self.final if self.final is not None else self.micro_batch == self.accumulation - 1

    @torch.no_grad()
    def _on_gradient(self, p: Tensor) -> None:
        if not self._end_queued:  # once per backward: run _end_backward when autograd finishes (as DDP does)
            if self._world > 1 and self.ends_window():
                self._refuse_partly_unused()
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
            self._end_queued = True
        if self.ends_window():
            self._step(p)
        else:
            self._accumulate(p)

    def _refuse_partly_unused(self) -> None:
        """Before the window's first all-reduce: raise on every rank if some parameter has a
        gradient this window (from an earlier micro-batch, or coming in this backward) on some
        ranks only — its all-reduce would be paired with another parameter's."""
        params = list(self._groups)
        has_gradient = [p in self._pending or p in self._lows or _will_get_gradient(p) for p in params]
        counts = torch.tensor(has_gradient, dtype=torch.int32, device=params[0].device)
        dist.all_reduce(counts, group=self.process_group)
        partly = [(p, has) for p, has, count in zip(params, has_gradient, counts.tolist()) if 0 < count < self._world]
        _release(counts)
        if partly:
            names = ", ".join(f"{self.optimizer._name(p)} ({'has one' if has else 'none'} on this rank)"
                              for p, has in partly)
            raise RuntimeError(
                f"layer-wise updates under data parallel: these parameters got a gradient in this step on some ranks "
                f"but not on others: {names}. Each parameter's gradient is all-reduced in the same order on every "
                "rank, so each must get one on every rank or on none (there is no find_unused_parameters); nothing "
                "was updated in this step. Make them take part in every rank's forward (e.g. add 0 * p.sum() to "
                "the loss), freeze them (requires_grad=False), or leave them out of the optimizer")

    def _needs_full(self, p: Tensor) -> bool:
        """Whether ``p`` keeps (and, under data parallel, reduces) its full gradient this window."""
        reduces_full = self._world > 1 and self.communication == "full"
        return reduces_full or self.optimizer.needs_full_gradient(p, self._group(p))

    def _accumulate(self, p: Tensor) -> None:
        self._pending[p] = None
        if self._needs_full(p):
            return  # autograd keeps summing into p.grad
        low = self.optimizer.project(p, p.grad)
        if p in self._lows:
            self._lows[p].add_(low)
        else:
            self._lows[p] = low
        p.grad = None

    def _step(self, p: Tensor) -> None:
        """Step ``p`` with what the window gathered (``R_acc``, its gradient), after averaging it
        over the ranks under data parallel."""
        self._pending.pop(p, None)
        low = self._lows.pop(p, None)
        if p.grad is not None and (low is not None or (self._world > 1 and not self._needs_full(p))):
            projected = self.optimizer.project(p, p.grad)
            low = projected if low is None else low.add_(projected)
            p.grad = None
        if low is None and p.grad is None:
            return
        if self._world == 1:
            return self._update(p, low)
        payload = (low if low is not None else p.grad).div_(self._world)
        work = dist.all_reduce(payload, group=self.process_group, async_op=True)
        self._in_flight.append((p, low, payload, work))
        self._sent += payload.numel() * payload.element_size()
        self._finish_arrived()

    def _update(self, p: Tensor, low: Tensor | None) -> None:
        if low is not None:
            self.optimizer.receive(p, low)  # the optimizer's gradient seam
        self.optimizer.step_group(self._group(p), [p])
        p.grad = None

    def _finish_arrived(self, wait: bool = False) -> None:
        """Step the parameters whose all-reduce completed, oldest first (the same order on
        every rank); with ``wait``, or while more than ``bucket_cap_mb`` is in flight, wait."""
        while self._in_flight:
            p, low, payload, work = self._in_flight[0]
            in_flight = sum(t.numel() * t.element_size() for _, _, t, _ in self._in_flight)
            if not (wait or in_flight > self._cap_bytes or work.is_completed()):
                return
            work.wait()
            self._in_flight.popleft()
            self._update(p, low)
            _release(payload)

    def _end_backward(self) -> None:
        self._end_queued = False
        if self.ends_window():
            with torch.no_grad():
                for p in list(self._pending):  # used earlier in the window, not in its last micro-batch
                    self._step(p)
                self._finish_arrived(wait=True)
            if self._world > 1:
                self.optimizer.comm_bytes, self._sent = self._sent, 0
            self.micro_batch = 0
        else:
            self.micro_batch += 1
        self.final = None

    def _group(self, p: Tensor) -> dict[str, Any]:
        return self._groups[p]

    # ------------------------------------------------------------------ accounting
    def accumulator_bytes(self) -> dict[str, int]:
        """Bytes the open window holds between micro-batches: ``low_rank`` (the ``R_acc``
        tensors) and ``full`` (gradients kept in ``p.grad``)."""
        low_rank = sum(t.numel() * t.element_size() for t in self._lows.values())
        full = sum(p.grad.numel() * p.grad.element_size() for p in self._pending if p.grad is not None)
        return {"low_rank": low_rank, "full": full}


def _release(payload: Tensor) -> None:
    """Free the memory of ``payload``, an all-reduced ``R`` or gradient whose parameter was just
    stepped with it, now and on this thread. The process group's work still references a
    completed all-reduce's tensor (gloo's: often for more than 10 ms after ``wait()``) and
    would free it later on its worker thread: past the ``bucket_cap_mb`` accounting, and unseen
    by ``torch.profiler``'s memory events, which follow the profiled thread. FSDP frees its
    all-gather buffers the same way."""
    payload.untyped_storage().resize_(0)


def _will_get_gradient(p: Tensor) -> bool:
    """Whether the backward in progress reaches ``p``'s gradient accumulator (as
    ``torch.autograd.graph.register_multi_grad_hook`` asks the engine)."""
    return torch._C._will_engine_execute_node(get_gradient_edge(p).node)


def _world_size(process_group: Any) -> int:
    """Ranks to average over: the group's size, the world's when none is given (1 without
    ``torch.distributed``)."""
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise ValueError("process_group given, but torch.distributed is not initialized")
        return 1
    return dist.get_world_size(process_group)
