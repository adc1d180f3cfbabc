"""Fira (Chen et al. 2024, "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
Constraint?"): GaLore plus the norm-scaled residual the projection throws away."""

from __future__ import annotations

from torch import Tensor

from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.rules.base import RuleInputs, UpdateRule
from lit_lowrank.projectors.base import Projector
from lit_lowrank.rules.norm_scaling import limit_growth_, limiter_layout, norm_ratio


class FiraRule(UpdateRule):
    """``U = α · lift(N) + limit(φ ⊙ (G − lift(R)))``, ``W ← W − η U``.

    ``lift`` is the projector's unscaled back-projection, so ``G − lift(R)`` is exactly the
    part of the gradient outside the subspace. ``φ = ‖N_j‖ / ‖R_j‖`` per channel j — per column
    of G for a left projection, per row for a right one (from the projector's side) — is how
    much the low-rank optimizer rescaled that channel (Fira's norm-based scaling). The limiter caps the
    growth of ‖φ ⊙ residual‖ between steps at ``gamma`` (Fira's norm-growth limiter).

    Args:
        scale: α, multiplying the lifted low-rank update (0.25 in Fira's LLaMA runs).
        gamma: norm-growth limit γ (1.01); ``None`` disables the limiter.
        scaled_residual: subtract ``α · lift(R)`` instead of ``lift(R)``, as the fira package
            does; with α < 1 that leaks ``(1 − α)`` of the in-subspace gradient into the
            residual. Off by default (the paper's residual).

    Deliberate difference from the fira package: ``N`` is bias-corrected (paper convention), so
    φ and the limiter's history are in the units of the applied update; fira applies the
    bias-correction factor after the limiter.

    State: ``limiter_norm`` (``{"norm": 0-dim float32}``), the limited residual norm of the
    previous step; an all-zero residual leaves it unchanged (unlike fira, which stores the 0
    and then caps the next residuals at γ^k · 1e-8). φ and the norms are computed in float32.
    """

    batched = True
    shardable = True

    def __init__(self, scale: float = 1.0, *, gamma: float | None = 1.01, scaled_residual: bool = False) -> None:
        super().__init__(scale)
        if gamma is not None and gamma < 1:
            raise ValueError(f"gamma must be >= 1 (or None to disable the limiter), got {gamma}")
        self.gamma = gamma
        self.scaled_residual = scaled_residual

    def apply_(self, param: Tensor, inputs: RuleInputs, *, step_size: float) -> None:
        lifted_share = self.scale if self.scaled_residual else 1.0
        residual = inputs.projector.add_back_(inputs.grad.clone(), inputs.low, alpha=-lifted_share)  # G − lift(R), m×n
        residual.mul_(norm_ratio(inputs.direction, inputs.low, inputs.projector.side, "channel"))
        if self.gamma is not None:
            limit_growth_(residual, inputs.state, "limiter_norm", self.gamma, inputs.reduce_grad)
        param.add_(residual, alpha=-step_size)
        inputs.projector.add_back_(param, inputs.direction, alpha=-step_size * self.scale)

    def state_layout(self, grad: Tensor, low: Tensor, projector: Projector) -> dict:
        """The limiter's norm per matrix (see :func:`~lit_lowrank.rules.norm_scaling.limiter_layout`)."""
        return limiter_layout(grad, "limiter_norm", self.gamma)


@hookimpl
def register_update_rules(register) -> None:
    register("fira", FiraRule)
