"""What a step may consume, and how a step that fails is undone.

A step either updates every parameter or none (``LowRankOptimizer.step``): sparse and
non-finite gradients are found here, for all param groups at once, before a moment, a
projector, a counter or a weight is touched. The policy for non-finite values is the param
groups' ``nonfinite`` option:

* ``skip`` (default) — the whole step is skipped and counted (``optimizer.skipped_steps``), with
  a warning naming the first offending parameter;
* ``raise`` — ``FloatingPointError`` naming it;
* ``ignore`` — no check: NaN/inf flow into the moments, projectors and weights.

A non-finite *weight* (fp16 overflow, a faulty plugin update, a corrupted checkpoint) makes
every later gradient non-finite, so skipping can never recover from it: when a step's
gradients are non-finite the weights are checked too, and a non-finite one raises
``FloatingPointError`` naming it, whatever the policy (except ``ignore``). The group option
``max_consecutive_skips`` (default :data:`MAX_CONSECUTIVE_SKIPS`) bounds how many updates of
one parameter may be skipped in a row (steps, or parameter updates in layer-wise mode): the
next one raises ``FloatingPointError``; None never stops a run; a good update resets the count.

Once the gradients are admitted, a step runs in two phases.

1. *Compute* — everything that can fail: subspace refreshes, projections ``R``, the inner
   optimizer's directions ``N`` (its moments updated in place), the rules' inputs (collectives
   of a sharded weight) and the rules themselves. Each thing is recorded in a
   :class:`StepJournal` right before it changes: the projectors and schedules due a refresh,
   the moments and rule state (r×n), the step counters, the optimizer's counters, and the
   weights a rule or dense group writes during this phase (copied: a rule without
   ``UpdateRule.lifts_only``, a weight kept in another format — int-weights — and dense groups
   other than the largest). A rule with ``lifts_only`` (GaLore's) writes no weight here, and its
   weights are never copied (:mod:`lit_lowrank.optim.deferred`): its lifts ``W ← W − η α P N``
   are recorded for the next phase; or, where its inner optimizer ``fails_only_out_of_memory``
   (Adam, SGD, Lion) and the weight is neither started nor refreshed this step, the moment
   update and the rule move to the next phase as well, and only the step counter is recorded
   (the moments are not copied). If anything fails (an exception, or Ctrl-C), the journal puts
   back everything recorded, newest first, and the error propagates: the step left nothing
   changed, bitwise.
2. *Apply* — with Ctrl-C held (:class:`HeldInterrupt`) until the step is complete: torch's
   AdamW on the largest dense group (not copied: torch checks its inputs before it changes
   anything, and a refusal still undoes the whole step), then the recorded lifts, each decoupled
   decay ``W ← (1 − ηλ) W`` and ``addmm_`` in place, then the moved moment updates and their
   lifts. These kernels raise nothing on valid inputs; the one failure left is running out of
   memory inside one (an allocator's workspace, a direction's buffer). That is not undone: the
   step is then *partly applied* — the weights already written keep their update, moments may
   have advanced — and a ``RuntimeError`` names the weights whose update was not written, so
   that the run is resumed from a checkpoint.
"""

from __future__ import annotations

import copy
import numbers
import signal
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from lit_lowrank.options import MAX_CONSECUTIVE_SKIPS

NONFINITE = ("skip", "raise", "ignore")


def check_nonfinite_option(value: Any) -> None:
    if value not in NONFINITE:
        raise ValueError(f"nonfinite={value!r}; expected one of {NONFINITE}")


def check_max_consecutive_skips(value: Any) -> None:
    """``max_consecutive_skips``: an integer >= 1, or None (no bound). 0 is refused: it could mean
    "no bound" or "no skip", and each has its own spelling."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"max_consecutive_skips must be an integer or None, got {value!r} "
                        f"({type(value).__name__}); e.g. {MAX_CONSECUTIVE_SKIPS}")
    if value < 1:
        raise ValueError(f"max_consecutive_skips must be >= 1 or None, got {value}; set None to never stop a run "
                         "for skipped steps, or nonfinite: raise to stop at the first non-finite gradient")


def first_nonfinite(tensors: list[Tensor], sources: list[Tensor] | None = None) -> int | None:
    """Index of the first tensor holding a NaN or ±inf, or None; with ``sources``, the first
    whose source holds one, each tensor being computed from its source so that a NaN or ±inf
    there reaches it (a projection ``R = G Q`` or ``Lᵀ G`` of ``G``: every entry of ``R`` sums
    products with a whole row or column of ``G``).

    One sum per tensor (NaN and ±inf propagate into it; float32 for half dtypes, whose own sums
    overflow early) and one host sync screen them all — on the CPU 15× cheaper than
    ``isfinite().all()`` or an inf-norm; a flagged sum that only overflowed (finite values
    summing past the dtype's range) is cleared by an exact ``isfinite`` of its source.
    """
    if not tensors:
        return None
    device = tensors[0].device
    sums = torch.stack([screening_sum(tensor).to(device) for tensor in tensors])
    flagged = (~sums.isfinite()).nonzero().flatten().tolist()
    sources = tensors if sources is None else sources
    return next((index for index in flagged if not bool(sources[index].isfinite().all())), None)


def screening_sum(tensor: Tensor) -> Tensor:
    """The sum of ``tensor``'s entries, in float32 at least (torch's own sum of a float32 or
    float64 tensor, twice as fast on the CPU as one asked for a dtype)."""
    return tensor.sum() if tensor.dtype in (torch.float32, torch.float64) else tensor.sum(dtype=torch.float32)


class StepJournal:
    """What one optimizer step changed, recorded right before each change, so that
    :meth:`undo` can put it all back (newest first) when the step fails.

    Each thing is recorded once per step, by identity: a tensor (copied), an entry of a dict
    (its value deep-copied, or its absence), an object with ``state_dict``/``load_state_dict``
    (projectors, schedules, weight stores), an attribute. Only what the step reaches is copied.
    """

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self._recorded: set[tuple[int, ...]] = set()

    def _first(self, *key: object) -> bool:
        """Whether ``key`` (objects, by identity) is recorded for the first time."""
        ids = tuple(id(part) for part in key)
        if ids in self._recorded:
            return False
        self._recorded.add(ids)
        return True

    def tensor(self, tensor: Tensor) -> None:
        """Record ``tensor``'s values (it will be changed in place)."""
        if self._first(tensor):
            saved = tensor.clone()
            self._undo.append(lambda: tensor.copy_(saved))

    def entry(self, mapping: dict, key: Any) -> None:
        """Record ``mapping[key]`` (a copy that later in-place changes cannot reach), or that it is absent."""
        if not self._first(mapping, key):
            return
        if key in mapping:
            saved = deep_copy(mapping[key])
            self._undo.append(lambda: mapping.__setitem__(key, saved))
        else:
            self._undo.append(lambda: mapping.pop(key, None))

    def stateful(self, owner: Any) -> None:
        """Record ``owner.state_dict()``, restored with ``owner.load_state_dict``."""
        if self._first(owner):
            saved = deep_copy(owner.state_dict())
            self._undo.append(lambda: owner.load_state_dict(saved))

    def attribute(self, owner: Any, name: str) -> None:
        """Record ``owner.<name>`` (a copy of it)."""
        if self._first(owner, name):
            saved = copy.deepcopy(getattr(owner, name))
            self._undo.append(lambda: setattr(owner, name, saved))

    def contents(self, mapping: dict) -> None:
        """Record every entry of ``mapping``, which others hold by reference (it is refilled in place)."""
        if self._first(mapping):
            saved = dict(mapping)
            self._undo.append(lambda: (mapping.clear(), mapping.update(saved)))

    def undo(self) -> None:
        """Put back everything recorded, newest first."""
        while self._undo:
            self._undo.pop()()


class HeldInterrupt:
    """Ctrl-C (SIGINT) held back during a block that must not stop half-way, and delivered by
    :meth:`raise_held` to the handler that was in place (Python's raises ``KeyboardInterrupt``)
    once the caller is in a consistent state. In the main thread only (signals are handled there),
    and only over a handler set from Python."""

    def __init__(self) -> None:
        self.received = False

    @contextmanager
    def held(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
            yield
            return
        previous = signal.signal(signal.SIGINT, self._receive)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _receive(self, signum: int, frame: Any) -> None:
        self.received = True

    def raise_held(self) -> None:
        if self.received:
            self.received = False
            signal.raise_signal(signal.SIGINT)


def deep_copy(tree: Any) -> Any:
    """A copy of ``tree`` (tensors, nested in dicts, lists or tuples, and plain values) that
    later in-place changes cannot reach."""
    if isinstance(tree, Tensor):
        return tree.clone()
    if isinstance(tree, dict):
        return {key: deep_copy(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(deep_copy(value) for value in tree)
    return copy.deepcopy(tree)
