"""Fixed-gap refresh (GaLore): recompute the subspace every ``gap`` steps: 0, T, 2T, ..."""

from __future__ import annotations

from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.schedules.base import Schedule


class FixedGap(Schedule):
    """Refresh at steps 0, gap, 2·gap, ... (GaLore's ``update_proj_gap`` T, default 200)."""

    def __init__(self, gap: int = 200) -> None:
        super().__init__()
        if gap < 1:
            raise ValueError(f"refresh gap must be >= 1 step, got {gap}")
        self.gap = gap

    def after_refresh(self, step: int, similarity: float | None) -> None:
        self.next_refresh = step + self.gap


class EveryStep(FixedGap):
    """Refresh on every step (online subspace descent)."""

    def __init__(self) -> None:
        super().__init__(gap=1)


@hookimpl
def register_schedules(register) -> None:
    register("fixed", FixedGap)
    register("every-step", EveryStep)
