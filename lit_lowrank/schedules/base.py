"""The Schedule contract: when a parameter's projector is refreshed (docs/plugins.md)."""

from __future__ import annotations

import torch
from torch import Tensor


class Schedule:
    """Decides, per parameter, at which optimizer steps the subspace is recomputed.

    ``step`` is the number of updates the parameter has already received (0 on its first
    step). The base class refreshes on the first step only; subclasses set
    :attr:`next_refresh` in :meth:`after_refresh`.

    Built by the optimizer once per weight, offered ``gap`` (the group's ``update_gap``, T) if
    ``__init__`` accepts it; the user's ``schedule_args`` come on top.
    """

    def __init__(self) -> None:
        self.next_refresh = 0

    def should_refresh(self, step: int) -> bool:
        return step >= self.next_refresh

    def after_refresh(self, step: int, similarity: float | None) -> None:
        """Called after each refresh. ``similarity`` is |cos| between the previous and the new
        leading basis vector (None on the first refresh)."""
        self.next_refresh = torch.iinfo(torch.int64).max

    def state_dict(self) -> dict[str, Tensor]:
        return {"next_refresh": torch.tensor(self.next_refresh)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.next_refresh = int(state["next_refresh"])
