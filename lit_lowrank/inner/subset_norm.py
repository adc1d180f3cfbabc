"""Subset norms (Nguyen et al. 2025, "Efficient Adaptive Optimization via Subset-Norm and
Subspace-Momentum"): one second-moment value per subset of a matrix's coordinates — a row or a
column — instead of one per coordinate. Shared by the ``snsm`` rule (subsets of G) and the
``adamw-sn`` inner optimizer (subsets of R)."""

from __future__ import annotations

import math

from torch import Tensor

SUBSETS = ("auto", "rows", "columns")
"""``rows``: one value per row (m×1); ``columns``: per column (1×n); ``auto``: the paper's
heuristic, summing along the shorter axis so that the state has max(m, n) values."""


def check_subset_options(beta2: float, eps: float, subsets: str) -> None:
    """Refuse options the subset-norm update cannot run with, naming the option."""
    if subsets not in SUBSETS:
        raise ValueError(f"subsets must be one of {', '.join(SUBSETS)}, got {subsets!r}")
    if not 0 <= beta2 <= 1:
        raise ValueError(f"subset-norm β2 must be in [0, 1] (1: AdaGrad's running sum), got {beta2}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be finite and > 0, got {eps}")


def subset_squares(matrix: Tensor, subsets: str) -> Tensor:
    """``s_i = Σ_j X_ij²`` per row (m×1) or per column (1×n) of ``matrix`` X, in float32."""
    rows, cols = matrix.shape
    per_row = subsets == "rows" or (subsets == "auto" and rows >= cols)
    return matrix.float().square().sum(dim=1 if per_row else 0, keepdim=True)


def accumulate_(norm: Tensor, squares: Tensor, beta2: float) -> Tensor:
    """``V ← β2 V + (1 − β2) s`` in place; ``V ← V + s`` (AdaGrad) for β2 = 1."""
    return norm.add_(squares) if beta2 == 1 else norm.lerp_(squares, 1 - beta2)


def second_correction(beta2: float, step: int) -> float:
    """``√(1 − β2ᵗ)``, the factor that turns ``1/√V`` into ``1/√V̂``; 1 for β2 = 1 (a sum has
    no bias to correct)."""
    return 1.0 if beta2 == 1 else math.sqrt(1 - beta2**step)
