"""EMA momentum in low-rank space without a second moment: the subspace momentum of Nguyen et al.
2025 ("Efficient Adaptive Optimization via Subset-Norm and Subspace-Momentum")."""

from __future__ import annotations

import torch
from torch import Tensor

from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.inner.base import InnerOptimizer, zeros_like_state


class MomentumInner(InnerOptimizer):
    """``M ← β1 M + (1 − β1) R``; ``N = M``; the whole update is scaled by ``1 / (1 − β1ᵗ)``
    (:meth:`step_size_factor`), Adam's first-moment bias correction.

    With the ``galore`` rule this is GaLore with bias-corrected heavy-ball momentum; with the
    ``snsm`` rule it is the subspace momentum of SNSM, whose complement ``G − P R`` and
    subset-norm step sizes the rule adds.

    Args:
        betas: ``(β1, β2)``; only β1 is read here (β2 is the ``snsm`` rule's, which is offered the
            same group ``betas``), so a group's betas configure both halves of SNSM at once.

    State: ``exp_avg`` (R's shape).
    """

    fails_only_out_of_memory = True
    linear_state = ("exp_avg",)
    batched = True
    elementwise = True

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999)) -> None:
        if not 0 <= betas[0] < 1:
            raise ValueError(f"momentum β1 must be in [0, 1), got {betas[0]}")
        self.betas = tuple(betas)

    def init_state(self, low: Tensor) -> dict[str, Tensor]:
        return zeros_like_state(low, "exp_avg")

    @torch.no_grad()
    def directions(self, lows: list[Tensor], states: list[dict[str, Tensor]], step: int) -> list[Tensor]:
        exp_avgs = [state["exp_avg"] for state in states]
        torch._foreach_lerp_(exp_avgs, lows, 1 - self.betas[0])
        return [exp_avg.clone() for exp_avg in exp_avgs]

    def step_size_factor(self, step: int) -> float:
        return 1 / (1 - self.betas[0] ** step)


@hookimpl
def register_inner_optimizers(register) -> None:
    register("momentum", MomentumInner)
