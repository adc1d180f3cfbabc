"""The Schedule contract: when a parameter's projector is refreshed (docs/plugins.md), and
:class:`GapSchedule`, the refresh every T steps that the built-in schedules share, optionally
staggered across the weights."""

from __future__ import annotations

import torch
from torch import Tensor


class Schedule:
    """Decides, per parameter, at which optimizer steps the subspace is recomputed.

    ``step`` is the number of updates the parameter has already received (0 on its first
    step). The base class refreshes on the first step only; subclasses set
    :attr:`next_refresh` in :meth:`after_refresh`.

    Built by the optimizer once per weight, offered ``gap`` (the group's ``update_gap``, T) if
    ``__init__`` accepts it; the user's ``schedule_args`` come on top. The optimizer then tells
    it the weight's position (:meth:`set_position`).
    """

    def __init__(self) -> None:
        self.next_refresh = 0

    def should_refresh(self, step: int) -> bool:
        return step >= self.next_refresh

    def after_refresh(self, step: int, similarity: float | None) -> None:
        """Called after each refresh. ``similarity`` is |cos| between the previous and the new
        leading basis vector (None on the first refresh)."""
        self.next_refresh = torch.iinfo(torch.int64).max

    def set_position(self, index: int, count: int) -> None:
        """Called once by the optimizer right after building the schedule, before its first
        refresh (and before :meth:`load_state_dict` on a resume): the weight is number ``index``
        (from 0) of the optimizer's ``count`` low-rank weights, in the order of its param groups,
        the same on every rank. The base ignores it; a schedule may use it to spread the weights'
        refreshes over the steps (:class:`GapSchedule`'s ``stagger``)."""

    def state_dict(self) -> dict[str, Tensor]:
        return {"next_refresh": torch.tensor(self.next_refresh)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.next_refresh = int(state["next_refresh"])


class GapSchedule(Schedule):
    """Refresh ``gap`` steps (T) after each refresh; a subclass may change :attr:`gap` as it goes.

    ``stagger=True`` gives weight i of the optimizer's N low-rank weights (:meth:`set_position`)
    the phase ``φᵢ = ⌊i·T/N⌋`` (0 ≤ φᵢ < T), added once, to its first cycle. A weight whose
    first step is s₀ then refreshes at

        s₀,   s₀ + T + φᵢ,   s₀ + 2T + φᵢ,   s₀ + 3T + φᵢ, ...

    Its first refresh cannot move (a weight cannot step without a basis), so the weights that
    start together all refresh at s₀; from then on the weights refreshing at step s₀ + kT + φ
    (k ≥ 1) are those with φᵢ = φ: at most ⌈N/T⌉ of them at any step, instead of all N every T
    steps. Each weight takes the same SVDs as without staggering, never more (its second refresh
    comes φᵢ steps later), and its first basis serves T + φᵢ < 2T steps. ``φ₀ = 0``: the first
    weight refreshes as without staggering. A weight added later (``add_param_group``) is placed
    among the weights the optimizer holds at its first step; those placed before keep their phases.

    State (tensors only): ``next_refresh``; with ``stagger``, also ``phase`` (φᵢ) and
    ``phase_due`` (whether φᵢ is still to be added), so a resumed run keeps the phases it
    started with. A staggered schedule loading the state of an unstaggered one (stagger turned
    on at a resume) adds its own phase at its next refresh; an unstaggered one loading a
    staggered state refreshes every T steps from the refresh the checkpoint scheduled.
    """

    def __init__(self, gap: int = 200, stagger: bool = False) -> None:
        super().__init__()
        if gap < 1:
            raise ValueError(f"refresh gap must be >= 1 step, got {gap}")
        if not isinstance(stagger, bool):
            raise TypeError(f"stagger must be true or false, got {stagger!r} ({type(stagger).__name__}); "
                            "true spreads the weights' refreshes over the gap")
        self.gap = gap
        self.stagger = stagger
        self.phase = 0
        self.phase_due = stagger

    def set_position(self, index: int, count: int) -> None:
        """With ``stagger``: the phase ``φ = ⌊index·T/count⌋`` of this weight's refreshes."""
        if self.stagger:
            self.phase = index * self.gap // count

    def after_refresh(self, step: int, similarity: float | None) -> None:
        self.next_refresh = self._next_after(step)

    def _next_after(self, step: int) -> int:
        """The step of the refresh after one at ``step``: ``gap`` steps on, plus the phase the first time."""
        delay = self.phase if self.phase_due else 0
        self.phase_due = False
        return step + self.gap + delay

    def state_dict(self) -> dict[str, Tensor]:
        state = super().state_dict()
        if self.stagger:
            state.update(phase=torch.tensor(self.phase), phase_due=torch.tensor(self.phase_due))
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        if self.stagger and "phase" in state:
            self.phase, self.phase_due = int(state["phase"]), bool(state["phase_due"])
