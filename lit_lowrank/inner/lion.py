"""Lion in low-rank space (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms",
Program 1): the sign of an interpolated momentum, one moment of R's shape."""

from __future__ import annotations

import torch
from torch import Tensor

from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.inner.base import InnerOptimizer, zeros_like_state


class LionInner(InnerOptimizer):
    """``N = sign(β1 M + (1 − β1) R)``, then ``M ← β2 M + (1 − β2) R``.

    Every entry of ``N`` is ±1 (0 where the interpolation is exactly 0), so the step
    ``W ← W − lr · α · lift(N)`` has a fixed size per low-rank coordinate; the Lion paper uses
    an ``lr`` 3–10× smaller and a weight decay 3–10× larger than AdamW's. Decoupled weight decay
    is applied by the optimizer before the update, as Lion's ``θ ← θ − lr (N + λ θ)``.

    Args:
        betas: ``(β1, β2)``. The optimizer offers its own ``betas`` (AdamW's (0.9, 0.999) by
            default); Lion's paper uses **(0.9, 0.99)** — set them in ``inner_args`` so the dense
            AdamW group keeps its own.

    State: ``exp_avg`` (R's shape) — ``r·max(m, n)`` per weight with ``side: std``.
    """

    fails_only_out_of_memory = True
    linear_state = ("exp_avg",)
    batched = True
    elementwise = True

    def __init__(self, betas: tuple[float, float] = (0.9, 0.99)) -> None:
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"Lion's betas must be in [0, 1), got {tuple(betas)}")
        self.betas = tuple(betas)

    def init_state(self, low: Tensor) -> dict[str, Tensor]:
        return zeros_like_state(low, "exp_avg")

    @torch.no_grad()
    def directions(self, lows: list[Tensor], states: list[dict[str, Tensor]], step: int) -> list[Tensor]:
        beta1, beta2 = self.betas
        exp_avgs = [state["exp_avg"] for state in states]
        interpolated = torch._foreach_lerp(exp_avgs, lows, 1 - beta1)
        torch._foreach_sign_(interpolated)
        torch._foreach_lerp_(exp_avgs, lows, 1 - beta2)
        return interpolated


@hookimpl
def register_inner_optimizers(register) -> None:
    register("lion", LionInner)
