"""Adam moments in low-rank space (GaLore, Alg. 1): N = M̂ / (√V̂ + ε)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.inner.base import InnerOptimizer, bias_corrections, zeros_like_state


class AdamInner(InnerOptimizer):
    """``M ← β1 M + (1-β1) R``; ``V ← β2 V + (1-β2) R²``;
    ``N = (M / (1-β1ᵗ)) / (√(V / (1-β2ᵗ)) + ε)``.

    ε is added to the bias-corrected √V̂ as in the GaLore paper and ``torch.optim.AdamW``;
    galore-torch adds it before the correction (ε/√(1-β2ᵗ) in these terms). Weight decay is
    not part of the inner update: the optimizer applies it to the full weight.
    """

    fails_only_out_of_memory = True
    linear_state = ("exp_avg",)
    batched = True
    elementwise = True
    quadratic_state = ("exp_avg_sq",)

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.betas = tuple(betas)
        self.eps = eps

    def init_state(self, low: Tensor) -> dict[str, Tensor]:
        return zeros_like_state(low, "exp_avg", "exp_avg_sq")

    @torch.no_grad()
    def directions(self, lows: list[Tensor], states: list[dict[str, Tensor]], step: int) -> list[Tensor]:
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        if all(low.device.type in FUSED_DEVICES for low in lows):
            return self._fused(lows, exp_avgs, exp_avg_sqs, step)
        return self._foreach(lows, exp_avgs, exp_avg_sqs, step)

    def _fused(self, lows: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], step: int) -> list[Tensor]:
        """torch's fused AdamW kernel, one pass over the moments: run on zero "parameters" with
        lr = −1 it leaves exactly ``N`` in them."""
        beta1, beta2 = self.betas
        directions = [torch.zeros_like(low) for low in lows]
        step_tensor = torch.tensor(float(step), device=lows[0].device)  # read, not written, by the kernel
        steps = [step_tensor] * len(lows)
        torch._fused_adamw_(directions, lows, exp_avgs, exp_avg_sqs, [], steps, lr=-1.0, beta1=beta1, beta2=beta2,
                            weight_decay=0.0, eps=self.eps, amsgrad=False, maximize=False)
        return directions

    def _foreach(self, lows: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], step: int) -> list[Tensor]:
        beta1, beta2 = self.betas
        correction1, correction2 = bias_corrections(self.betas, step)
        torch._foreach_lerp_(exp_avgs, lows, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, lows, lows, 1 - beta2)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, math.sqrt(correction2))
        torch._foreach_add_(denoms, self.eps)
        directions = torch._foreach_div(exp_avgs, denoms)
        torch._foreach_div_(directions, correction1)
        return directions


FUSED_DEVICES = ("cpu", "cuda")
"""Devices with torch's fused AdamW kernel (torch >= 2.4); others take the ``_foreach`` path."""


@hookimpl
def register_inner_optimizers(register) -> None:
    register("adamw", AdamInner)
