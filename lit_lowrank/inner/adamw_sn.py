"""Subset-norm Adam on R (Nguyen et al. 2025, "Efficient Adaptive Optimization via Subset-Norm
and Subspace-Momentum", AdamSN): Adam's first moment, one second-moment value per row or column."""

from __future__ import annotations

import torch
from torch import Tensor

from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.inner.base import InnerOptimizer, change_basis
from lit_lowrank.inner.subset_norm import accumulate_, check_subset_options, second_correction, subset_squares


class SubsetNormAdamInner(InnerOptimizer):
    """``M ← β1 M + (1 − β1) R``; ``V ← β2 V + (1 − β2) s(R)``, ``s(R)_i = Σ_j R_ij²`` over the
    subset i (one row or column of R);
    ``N = √(1 − β2ᵗ)/(1 − β1ᵗ) · M / (√V + ε)``, V broadcast over its subset.

    The paper's step (and ``pytorch_optimizer.AdamWSN``'s): ε is added to √V before the bias
    corrections, which sit in ``N``, so every rule sees the corrected direction. β2 = 1 sums
    (``V ← V + s(R)``, AdaGrad's norm) without the ``√(1 − β2ᵗ)``. With GaLore's ``std`` side,
    ``auto`` subsets are the rows or columns of G that the projection keeps (R m×r: rows; r×n:
    columns), so V has max(m, n) values; at full rank with an orthonormal basis they are G's own
    row (column) norms, and the update is AdamWSN's with those subsets.

    Args:
        betas: ``(β1, β2)``, β1 ∈ [0, 1), β2 ∈ [0, 1].
        eps: ε added to √V (the authors' 1e-6; AdamWSN's default is 1e-8).
        subsets: ``auto | rows | columns`` of R; ``auto`` sums along R's shorter axis.

    State: ``exp_avg`` (R's shape, R's dtype) and ``subset_exp_avg_sq`` (V: a column or row of
    float32 values).
    """

    linear_state = ("exp_avg",)

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, subsets: str = "auto") -> None:
        if not 0 <= betas[0] < 1:
            raise ValueError(f"β1 must be in [0, 1), got {betas[0]}")
        check_subset_options(betas[1], eps, subsets)
        self.betas, self.eps, self.subsets = tuple(betas), eps, subsets

    def init_state(self, low: Tensor) -> dict[str, Tensor]:
        return {"exp_avg": torch.zeros_like(low, memory_format=torch.preserve_format),
                "subset_exp_avg_sq": torch.zeros_like(subset_squares(low, self.subsets))}

    @torch.no_grad()
    def directions(self, lows: list[Tensor], states: list[dict[str, Tensor]], step: int) -> list[Tensor]:
        beta1, beta2 = self.betas
        factor = second_correction(beta2, step) / (1 - beta1**step)
        directions = []
        for low, state in zip(lows, states):
            exp_avg = state["exp_avg"].lerp_(low, 1 - beta1)
            norm = accumulate_(state["subset_exp_avg_sq"], subset_squares(low, self.subsets), beta2)
            directions.append((exp_avg * factor / (norm.sqrt() + self.eps)).to(low.dtype))  # in float32 at least
        return directions

    def rotate(self, state: dict[str, Tensor], left: Tensor | None, right: Tensor | None) -> None:
        """M is mapped exactly (``left · M · rightᵀ``). V follows the axis it keeps: a value per
        row of R is mapped by ``left²`` when the rows are projected coordinates (r of them), a
        value per column by ``right²`` (exact for a diagonal covariance); the summed axis's
        rotation is taken as norm-preserving, so V over the coordinates the projection keeps
        (``auto``) is left as it is."""
        super().rotate(state, left, right)
        norm = state["subset_exp_avg_sq"]
        rows, cols = norm.shape
        row_map = left.square() if left is not None and left.shape[1] == rows else None
        col_map = right.square() if right is not None and right.shape[1] == cols else None
        norm.copy_(change_basis(norm, row_map, col_map).clamp_(min=0))


@hookimpl
def register_inner_optimizers(register) -> None:
    register("adamw-sn", SubsetNormAdamInner)
