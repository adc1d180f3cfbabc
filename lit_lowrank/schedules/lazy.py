"""Q-GaLore's layer-adaptive lazy refresh (Zhang et al. 2024, §3.3): a layer whose subspace
has settled gets its refresh gap multiplied, so it takes fewer SVDs."""

from __future__ import annotations

import torch
from torch import Tensor

from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.schedules.base import GapSchedule


class LazyGap(GapSchedule):
    """Refresh every ``gap`` steps, where ``gap`` grows by ``gamma`` once the subspace settles.

    After each refresh the optimizer reports ``similarity`` = |cos| between the previous and the
    new leading basis vector (sign-invariant, unlike q-galore-torch's signed cosine). The last
    ``queue_size`` values are kept; when the queue is full and its mean is ``>= threshold``,
    ``gap ← ⌊gap · gamma⌋``. With ``reset_queue`` (default) the queue is then emptied, so every
    further growth needs ``queue_size`` fresh similar refreshes; ``reset_queue=False`` keeps
    the rolling window, as q-galore-torch does, and the gap then grows at every refresh while
    the mean stays above the threshold.

    The next refresh is always ``gap`` steps after the last one. q-galore-torch refreshes
    instead at the steps where ``step % gap == 0``, so right after a growth its next refresh
    comes at the next multiple of the new gap (gap 200 → 400 at step 1000: it refreshes at
    1200, this schedule at 1400). ``reset_queue=False`` therefore reproduces q-galore-torch's
    sequence of gaps, not the steps at which it refreshes.

    Args:
        gap: initial refresh gap T (Q-GaLore: 200 for LLaMA pretraining).
        threshold: mean-similarity threshold (0.4).
        gamma: gap multiplier (2).
        queue_size: similarities averaged, k (5).
        reset_queue: empty the queue after each growth.
        stagger: spread the layers' refreshes over the initial gap: layer i of N adds
            ``⌊i·gap/N⌋`` steps to its first cycle (:class:`~lit_lowrank.schedules.base.GapSchedule`).

    State (tensors only): ``next_refresh``, ``gap``, ``queue`` (k values, NaN = empty slot),
    ``refreshes`` (SVDs taken by this layer) and ``growths``; with ``stagger``, ``phase`` and
    ``phase_due``. On load the gap is recomputed as this run's initial ``gap`` grown ``growths``
    times (:meth:`load_state_dict`).
    """

    def __init__(
        self, gap: int = 200, threshold: float = 0.4, gamma: float = 2.0, queue_size: int = 5,
        reset_queue: bool = True, stagger: bool = False,
    ) -> None:
        super().__init__(gap, stagger)
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        if gamma < 1:
            raise ValueError(f"gamma must be >= 1 (the gap only grows), got {gamma}")
        self.initial_gap = gap
        self.threshold = threshold
        self.gamma = gamma
        self.queue_size = queue_size
        self.reset_queue = reset_queue
        self.queue: list[float] = []
        self.refreshes = 0
        self.growths = 0

    def after_refresh(self, step: int, similarity: float | None) -> None:
        self.refreshes += 1
        if similarity is not None:
            self.queue = (self.queue + [float(similarity)])[-self.queue_size :]
            if len(self.queue) == self.queue_size and sum(self.queue) / self.queue_size >= self.threshold:
                self.gap = self._grown(self.gap)
                self.growths += 1
                if self.reset_queue:
                    self.queue = []
        self.next_refresh = self._next_after(step)

    def _grown(self, gap: int) -> int:
        """The gap after one growth: ``⌊gap · gamma⌋`` (never shorter)."""
        return max(gap, int(gap * self.gamma))

    def state_dict(self) -> dict[str, Tensor]:
        queue = torch.full((self.queue_size,), float("nan"), dtype=torch.float64)
        queue[: len(self.queue)] = torch.tensor(self.queue, dtype=torch.float64)
        return {**super().state_dict(), "gap": torch.tensor(self.gap), "queue": queue,
                "refreshes": torch.tensor(self.refreshes), "growths": torch.tensor(self.growths)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore the queue, the counters and the refresh already scheduled; the gap is this
        schedule's own initial ``gap`` (the run's ``update_gap``) grown the saved ``growths``
        times by its ``gamma``. So a run resumed with the same options continues exactly (the
        saved gap is that same product), and one resumed with another ``update_gap`` or
        ``gamma`` uses the new values from its next refresh on — as ``FixedGap``, whose
        gap is always the run's, does: the refresh the checkpoint scheduled stays."""
        super().load_state_dict(state)
        queue = state["queue"]
        self.queue = queue[~queue.isnan()].tolist()
        self.refreshes = int(state["refreshes"])
        self.growths = int(state["growths"])
        self.gap = self.initial_gap
        for _ in range(self.growths):
            self.gap = self._grown(self.gap)


@hookimpl
def register_schedules(register) -> None:
    register("lazy", LazyGap)
