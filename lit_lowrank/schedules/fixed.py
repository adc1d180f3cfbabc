"""Fixed-gap refresh (GaLore): recompute the subspace every ``gap`` steps: 0, T, 2T, ..."""

from __future__ import annotations

from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.schedules.base import GapSchedule


class FixedGap(GapSchedule):
    """Refresh at steps 0, gap, 2·gap, ... (GaLore's ``update_proj_gap`` T, default 200).

    ``stagger: true`` spreads the weights' refreshes over the gap: weight i of N refreshes at
    0, T + ⌊i·T/N⌋, 2T + ⌊i·T/N⌋, ... (:class:`~lit_lowrank.schedules.base.GapSchedule`).
    """


class EveryStep(FixedGap):
    """Refresh on every step (online subspace descent)."""

    def __init__(self) -> None:
        super().__init__(gap=1)


@hookimpl
def register_schedules(register) -> None:
    register("fixed", FixedGap)
    register("every-step", EveryStep)
