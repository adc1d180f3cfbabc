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

Not supported, by construction: global gradient-norm clipping (no per-parameter equivalent —
every other gradient is already gone when one parameter steps), gradient scaling for fp16 (the
scaler unscales ``p.grad`` after backward), and DDP (gradients are all-reduced after the hooks).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lit_lowrank.optim.lowrank import LowRankOptimizer


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

    The optimizer's own :meth:`~torch.optim.Optimizer.step` becomes a no-op (no parameter holds
    a gradient afterwards), so loops and frameworks that still call it behave.
    """

    def __init__(self, optimizer: LowRankOptimizer, accumulation: int = 1) -> None:
        if not isinstance(optimizer, LowRankOptimizer):
            raise TypeError(f"layer-wise updates need a LowRankOptimizer, got {type(optimizer).__name__}")
        if accumulation < 1:
            raise ValueError(f"accumulation must be >= 1 micro-batch, got {accumulation}")
        self.optimizer = optimizer
        self.accumulation = accumulation
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
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
            self._end_queued = True
        if self.ends_window():
            self._step(p)
        else:
            self._accumulate(p)

    def _accumulate(self, p: Tensor) -> None:
        self._pending[p] = None
        if self.optimizer.needs_full_gradient(p, self._group(p)):
            return  # autograd keeps summing into p.grad
        low = self.optimizer.project(p, p.grad)
        if p in self._lows:
            self._lows[p].add_(low)
        else:
            self._lows[p] = low
        p.grad = None

    def _step(self, p: Tensor) -> None:
        self._pending.pop(p, None)
        low = self._lows.pop(p, None)
        if low is not None and p.grad is not None:
            low.add_(self.optimizer.project(p, p.grad))
        if low is None and p.grad is None:
            return
        self.optimizer.step_group(self._group(p), [p], lows=None if low is None else {p: low})
        p.grad = None

    def _end_backward(self) -> None:
        self._end_queued = False
        if self.ends_window():
            with torch.no_grad():
                for p in list(self._pending):  # used earlier in the window, not in its last micro-batch
                    self._step(p)
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
