"""Adam with the HF ``transformers.AdamW`` convention — the optimizer inside galore-torch's
``GaLoreAdamW``, fira's ``FiraAdamW`` and apollo-torch's ``APOLLOAdamW`` — so that runs of those
packages (and of HF Trainer's ``optim="galore_adamw"``) reproduce to float rounding."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.inner.base import InnerOptimizer, bias_corrections, zeros_like_state


class HFAdamInner(InnerOptimizer):
    """``M ← β1 M + (1-β1) R``; ``V ← β2 V + (1-β2) R²``; ``N = M / (√V + ε)``, and the step
    size of the whole update is ``η · √(1-β2ᵗ)/(1-β1ᵗ)`` (η alone with ``correct_bias=False``).

    Differences from ``adamw`` (``N = M̂ / (√V̂ + ε)``, torch's convention):

    * ε is added to √V *before* the bias correction: ε/√(1-β2ᵗ) in ``adamw``'s terms, a
      large difference early in training at the peers' default ε = 1e-6;
    * the bias correction multiplies the rule's whole update, so Fira's and APOLLO's norm ratio
      φ = ‖N_j‖/‖R_j‖ and norm-growth limiter see the uncorrected ``N``, as in fira and
      apollo-torch;
    * weight decay is applied after the update, to the updated weight
      (:attr:`decay_after_step`);
    * dense groups naming it are stepped by it too (:attr:`steps_dense`), as the peers' single
      HF AdamW steps every parameter.

    Args:
        betas: ``(β1, β2)``; the optimizer offers its own.
        eps: ε; the optimizer offers its own — **set** ``eps=1e-6`` **for the peers' default**.
        correct_bias: apply the bias correction (HF's default); ``False`` as BERT's TF code.

    State: ``exp_avg``, ``exp_avg_sq`` (R's shape), as ``adamw`` (``keep``/``reset``/``rotate``
    work the same way).
    """

    fails_only_out_of_memory = True
    linear_state = ("exp_avg",)
    batched = True
    elementwise = True
    quadratic_state = ("exp_avg_sq",)
    decay_after_step = True
    steps_dense = True

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, correct_bias: bool = True) -> None:
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas must be in [0, 1), got {tuple(betas)}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not isinstance(correct_bias, bool):
            raise ValueError(f"correct_bias must be true or false, got {correct_bias!r}")
        self.betas = tuple(betas)
        self.eps = eps
        self.correct_bias = correct_bias

    def init_state(self, low: Tensor) -> dict[str, Tensor]:
        return zeros_like_state(low, "exp_avg", "exp_avg_sq")

    @torch.no_grad()
    def directions(self, lows: list[Tensor], states: list[dict[str, Tensor]], step: int) -> list[Tensor]:
        """The operations of ``transformers.AdamW.step``, in its order, batched with ``_foreach``."""
        beta1, beta2 = self.betas
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, lows, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, lows, lows, value=1 - beta2)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denoms, self.eps)
        return torch._foreach_div(exp_avgs, denoms)

    def step_size_factor(self, step: int) -> float:
        """``√(1-β2ᵗ)/(1-β1ᵗ)``, or 1 without bias correction."""
        if not self.correct_bias:
            return 1.0
        correction1, correction2 = bias_corrections(self.betas, step)
        return math.sqrt(correction2) / correction1


@hookimpl
def register_inner_optimizers(register) -> None:
    register("adamw-hf", HFAdamInner)
