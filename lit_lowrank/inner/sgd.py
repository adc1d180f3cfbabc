"""SGD with momentum in low-rank space: ``torch.optim.SGD``'s update applied to R."""

from __future__ import annotations

import torch
from torch import Tensor

from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.inner.base import InnerOptimizer, zeros_like_state


class SGDInner(InnerOptimizer):
    """``b ← μ b + (1 − τ) R`` (``b = R`` on the first step, as torch); ``N = R + μ b`` with
    Nesterov, else ``N = b``; ``N = R`` without momentum (μ = 0).

    The update is linear in R, so at full rank with an orthonormal basis it equals torch's SGD on
    the full weight. Weight decay is the optimizer's: torch SGD's coupled L2 (``R`` projects
    ``G + λW``) when the group sets ``decoupled_weight_decay=False``, as a converted SGD does.
    Dense parameters of the group step with this same update on their full gradient
    (``steps_dense``), so a converted SGD stays SGD everywhere.

    Args:
        momentum, dampening, nesterov: as ``torch.optim.SGD`` (μ, τ; Nesterov needs μ > 0, τ = 0).

    State: ``momentum_buffer`` (R's shape) when μ > 0, nothing otherwise.
    """

    fails_only_out_of_memory = True
    steps_dense = True
    batched = True
    elementwise = True

    def __init__(self, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False) -> None:
        if momentum < 0.0:
            raise ValueError(f"SGD momentum must be >= 0, got {momentum}")
        if nesterov and (momentum <= 0.0 or dampening != 0.0):
            raise ValueError(f"Nesterov momentum needs momentum > 0 and dampening = 0, got {momentum}, {dampening}")
        self.momentum, self.dampening, self.nesterov = momentum, dampening, nesterov
        self.linear_state = ("momentum_buffer",) if momentum else ()

    def init_state(self, low: Tensor) -> dict[str, Tensor]:
        return zeros_like_state(low, *self.linear_state)

    @torch.no_grad()
    def directions(self, lows: list[Tensor], states: list[dict[str, Tensor]], step: int) -> list[Tensor]:
        if not self.momentum:
            return [low.clone() for low in lows]
        buffers = [state["momentum_buffer"] for state in states]
        if step == 1:
            torch._foreach_copy_(buffers, lows)
        else:
            torch._foreach_mul_(buffers, self.momentum)
            torch._foreach_add_(buffers, lows, alpha=1 - self.dampening)
        if self.nesterov:
            return torch._foreach_add(lows, buffers, alpha=self.momentum)
        return [buffer.clone() for buffer in buffers]


@hookimpl
def register_inner_optimizers(register) -> None:
    register("sgd", SGDInner)
