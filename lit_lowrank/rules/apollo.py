"""APOLLO (Zhu et al. 2024, "APOLLO: SGD-like Memory, AdamW-level Performance"): the
low-rank optimizer only estimates a per-channel (or per-tensor) learning-rate scale for the raw
full-rank gradient."""

from __future__ import annotations

import math

from torch import Tensor

from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.rules.base import RuleInputs, UpdateRule
from lit_lowrank.projectors.base import Projector
from lit_lowrank.rules.norm_scaling import SCALINGS, limit_growth_, limiter_layout, norm_ratio


class ApolloRule(UpdateRule):
    """``U = √α · limit(G ⊙ s)`` with ``s = ‖N_j‖ / ‖R_j‖``, ``W ← W − η U``.

    The channels j are G's columns for a left projection and its rows for a right one (from
    the projector's side — APOLLO's channel-wise scaling); ``scaling="tensor"`` uses one ratio
    of Frobenius norms (APOLLO-Mini's tensor-wise scaling). APOLLO pairs this with the
    ``random`` projector (a seeded Gaussian refreshed every T steps) but any projector works.

    Args:
        scale: α. As in apollo-torch, the update is multiplied by **√α** (the paper's tables
            quote α; apollo-torch's code applies its square root): APOLLO α = 1, APOLLO-Mini 128.
        scaling: ``channel`` (APOLLO) or ``tensor`` (APOLLO-Mini).
        gamma: Fira's norm-growth limit γ (1.01), applied before √α; ``None`` disables it.

    Deliberate difference from apollo-torch: ``N`` is bias-corrected (paper convention), so the
    limiter's history is in the units of the applied update.

    State: ``limiter_norm`` (``{"norm": 0-dim float32}``); an all-zero gradient leaves it
    unchanged (unlike apollo-torch, which stores the 0 and then caps the next updates at
    γ^k · 1e-8). The ratios and norms are computed in float32.
    """

    batched = True
    shardable = True

    def __init__(self, scale: float = 1.0, *, scaling: str = "channel", gamma: float | None = 1.01) -> None:
        super().__init__(scale)
        if scaling not in SCALINGS:
            raise ValueError(f"unknown scaling {scaling!r}; expected one of {SCALINGS}")
        if scale <= 0:
            raise ValueError(f"APOLLO's scale enters as √scale and must be > 0, got {scale}")
        if gamma is not None and gamma < 1:
            raise ValueError(f"gamma must be >= 1 (or None to disable the limiter), got {gamma}")
        self.scaling = scaling
        self.gamma = gamma

    def apply_(self, param: Tensor, inputs: RuleInputs, *, step_size: float) -> None:
        ratio = norm_ratio(inputs.direction, inputs.low, inputs.projector.side, self.scaling,
                           inputs.reduce_low)  # float32
        update = inputs.grad.clone().mul_(ratio)  # G ⊙ s, multiplied in float32, kept in G's dtype
        if self.gamma is not None:
            limit_growth_(update, inputs.state, "limiter_norm", self.gamma, inputs.reduce_grad)
        param.add_(update, alpha=-step_size * math.sqrt(self.scale))

    def state_layout(self, grad: Tensor, low: Tensor, projector: Projector) -> dict:
        """The limiter's norm per matrix (see :func:`~lit_lowrank.rules.norm_scaling.limiter_layout`)."""
        return limiter_layout(grad, "limiter_norm", self.gamma)


class ApolloMiniRule(ApolloRule):
    """APOLLO-Mini: rank-1 projection, tensor-wise scaling, α = 128 (so √128 ≈ 11.3 multiplies
    the update). α is fixed here and the optimizer's ``scale`` option does not reach it; for
    another α use ``rule: apollo`` with ``rule_args: {scaling: tensor}``, which also takes any rank
    (``required_rank = 1`` here: the optimizer refuses another rank when it is built).
    """

    required_rank = 1

    def __init__(self, *, gamma: float | None = 1.01) -> None:
        super().__init__(128.0, scaling="tensor", gamma=gamma)


@hookimpl
def register_update_rules(register) -> None:
    register("apollo", ApolloRule)
    register("apollo-mini", ApolloMiniRule)
