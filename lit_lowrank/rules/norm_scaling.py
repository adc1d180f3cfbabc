"""Norm-based scaling shared by Fira and APOLLO.

Both methods turn the low-rank optimizer's output ``N`` into a full-rank step by measuring how
much the optimizer rescaled the projected gradient ``R``: ``φ = ‖N‖ / ‖R‖`` per channel
(Fira's norm-based scaling, APOLLO's channel-wise scaling) or per tensor (APOLLO-Mini), and
both damp sudden growth of the resulting full-rank term with Fira's norm-growth limiter.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_lowrank.projectors.base import Side

SCALINGS = ("channel", "tensor")
RATIO_EPS = 1e-8
"""Added to ‖R‖ so that a zero channel gets ratio 0 instead of NaN (as fira and apollo-torch do)."""


def channel_axis(side: Side) -> int:
    """The axis of ``R`` that is reduced for per-channel norms.

    ``Side.LEFT``: ``R = Lᵀ G`` (r×n) — channels are G's n columns, reduce axis 0.
    ``Side.RIGHT``: ``R = G Q`` (m×r) — channels are G's m rows, reduce axis 1.
    The axis comes from the side the projector chose, never from ``R``'s shape (a square ``R``
    would be ambiguous; apollo-torch derives it from the shape and breaks for non-``std`` sides).
    """
    if side == Side.LEFT:
        return 0
    if side == Side.RIGHT:
        return 1
    raise ValueError(
        f"channel-wise norm scaling needs a one-sided projection, but the projector's side is {side!r} "
        "(side: full projects both dimensions); use side std/reverse_std/left/right, or tensor-wise scaling."
    )


def norm_ratio(direction: Tensor, low: Tensor, side: Side, scaling: str = "channel") -> Tensor:
    """``φ = ‖N‖ / (‖R‖ + 1e-8)``, shaped to broadcast against the m×n gradient.

    Args:
        direction: the inner optimizer's output ``N`` (R's shape).
        low: the projected gradient ``R`` (r×n, m×r or r×r).
        side: the side the projector projected.
        scaling: ``channel`` — (1×n) for a left projection, (m×1) for a right one;
            ``tensor`` — a 0-dim ratio of Frobenius norms.
    """
    if scaling == "tensor":
        return torch.linalg.vector_norm(direction) / (torch.linalg.vector_norm(low) + RATIO_EPS)
    if scaling != "channel":
        raise ValueError(f"unknown scaling {scaling!r}; expected one of {SCALINGS}")
    axis = channel_axis(side)
    numerator = torch.linalg.vector_norm(direction, dim=axis, keepdim=True)
    return numerator / (torch.linalg.vector_norm(low, dim=axis, keepdim=True) + RATIO_EPS)


def limit_growth_(update: Tensor, state: dict[str, Tensor], key: str, gamma: float) -> Tensor:
    """Fira's norm-growth limiter, in place.

    If ``‖S_t‖ > γ ‖S_{t−1}‖`` then ``S_t ← S_t · γ ‖S_{t−1}‖ / ‖S_t‖``. ``state[key]["norm"]``
    keeps ``‖S_t‖`` after limiting: a 0-dim float32 (or float64) tensor inside a dict, because
    ``torch.optim.Optimizer.load_state_dict`` casts plain float state to the parameter's dtype
    (bf16 would round away the 1% that γ resolves) and ``LowRankOptimizer`` restores dict-valued
    state as saved. The factor is computed on the device, without a host synchronisation.
    """
    norm = torch.linalg.vector_norm(update, dtype=torch.promote_types(update.dtype, torch.float32))
    if key in state:
        factor = (gamma * (state[key]["norm"] + RATIO_EPS) / norm).clamp(max=1.0)
        update.mul_(factor.to(update.dtype))
        norm = norm * factor
    state[key] = {"norm": norm}
    return update
