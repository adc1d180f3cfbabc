"""GaLore's update (Zhao et al. 2024, Alg. 1): ``W ← W − η · α · P N``."""

from __future__ import annotations

from torch import Tensor

from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.rules.base import RuleInputs, UpdateRule


class GaLoreRule(UpdateRule):
    """Lift the low-rank direction with the projector and scale it by α; the lift is fused into
    the weight update (``addmm_``). Needs only ``N``, not the full gradient."""

    uses_gradient = False
    batched = True
    shardable = True
    any_projection = True
    lifts_only = True

    def apply_(self, param: Tensor, inputs: RuleInputs, *, step_size: float) -> None:
        inputs.projector.add_back_(param, inputs.direction, alpha=-step_size * self.scale)


@hookimpl
def register_update_rules(register) -> None:
    register("galore", GaLoreRule)
