"""Norm-based scaling shared by Fira and APOLLO.

Both methods turn the low-rank optimizer's output ``N`` into a full-rank step by measuring how
much the optimizer rescaled the projected gradient ``R``: ``φ = ‖N‖ / ‖R‖`` per channel
(Fira's norm-based scaling, APOLLO's channel-wise scaling) or per tensor (APOLLO-Mini), and
both damp sudden growth of the resulting full-rank term with Fira's norm-growth limiter.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from lit_lowrank.projectors.base import Side

SCALINGS = ("channel", "tensor")
RATIO_EPS = 1e-8
"""Added to ‖R‖ so that a zero channel gets ratio 0 instead of NaN (as fira and apollo-torch do).
Norms and ratios are computed in float32 (at least), where 1e-8 does not underflow as in fp16."""


def channel_axis(side: Side) -> int:
    """The axis of ``R`` that is reduced for per-channel norms.

    ``Side.LEFT``: ``R = Lᵀ G`` (r×n) — channels are G's n columns, reduce axis -2.
    ``Side.RIGHT``: ``R = G Q`` (m×r) — channels are G's m rows, reduce axis -1.
    (Counted from the end, so a stack of E matrices keeps its leading axis.)
    The axis comes from the side the projector chose, never from ``R``'s shape (a square ``R``
    would be ambiguous; apollo-torch derives it from the shape and breaks for non-``std`` sides).
    """
    if side == Side.LEFT:
        return -2
    if side == Side.RIGHT:
        return -1
    raise ValueError(
        f"channel-wise norm scaling needs a one-sided projection, but the projector's side is {side!r} "
        "(side: full projects both dimensions); use side std/reverse_std/left/right, or tensor-wise scaling."
    )


def precise_norm(tensor: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """``‖tensor‖`` (over ``dim``, kept; or over everything, 0-dim) accumulated and returned in
    float32 at least: a half-precision norm overflows above 65504 and its ε guard underflows."""
    precision = torch.promote_types(tensor.dtype, torch.float32)
    if dim is None:
        return torch.linalg.vector_norm(tensor, dtype=precision)
    return torch.linalg.vector_norm(tensor, dim=dim, keepdim=True, dtype=precision)


def matrix_norm(tensor: Tensor, reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """The Frobenius norm of an m×n matrix (0-dim), or of each matrix of an E×m×n stack (E×1×1).
    With ``reduce`` (``tensor`` is one rank's rows of a matrix split across ranks, see
    :class:`~lit_lowrank.rules.base.RuleInputs`): the norm of the whole matrix, ``√(Σ_i ‖T_i‖²)``."""
    norm = precise_norm(tensor) if tensor.ndim == 2 else precise_norm(tensor, (-2, -1))
    return norm if reduce is None else reduce(norm.square()).sqrt()


def norm_ratio(direction: Tensor, low: Tensor, side: Side, scaling: str = "channel",
               reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``φ = ‖N‖ / (‖R‖ + 1e-8)`` in float32 (at least), shaped to broadcast against the m×n
    gradient.

    Args:
        direction: the inner optimizer's output ``N`` (R's shape).
        low: the projected gradient ``R`` (r×n, m×r or r×r).
        side: the side the projector projected.
        scaling: ``channel`` — (1×n) for a left projection, (m×1) for a right one;
            ``tensor`` — one ratio of Frobenius norms (per matrix of a stack), shaped 1×1 so that multiplying a
            half-precision gradient by it happens in float32 (a 0-dim float32 factor would be
            cast to the gradient's dtype first, where a large φ overflows).
        reduce: for ``direction`` and ``low`` split by rows across ranks (``RuleInputs.reduce_low``),
            sums the tensor-wise squared norms over the ranks; channels never span ranks (a
            right projection's rows are local, a left one's R is whole on every rank).
    """
    if scaling == "tensor":
        ratio = matrix_norm(direction, reduce) / (matrix_norm(low, reduce) + RATIO_EPS)
        return ratio.reshape(*low.shape[:-2], 1, 1)
    if scaling != "channel":
        raise ValueError(f"unknown scaling {scaling!r}; expected one of {SCALINGS}")
    axis = channel_axis(side)
    return precise_norm(direction, axis) / (precise_norm(low, axis) + RATIO_EPS)


def limit_growth_(update: Tensor, state: dict[str, Tensor], key: str, gamma: float,
                  reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Fira's norm-growth limiter, in place.

    If ``‖S_t‖ > γ ‖S_{t−1}‖`` then ``S_t ← S_t · γ ‖S_{t−1}‖ / ‖S_t‖``. ``state[key]["norm"]``
    keeps ``‖S_t‖`` after limiting (per matrix of a stack: E×1×1, each expert limited on its
    own): a 0-dim float32 (or float64) tensor inside a dict, because
    ``torch.optim.Optimizer.load_state_dict`` casts plain float state to the parameter's dtype
    (bf16 would round away the 1% that γ resolves) and ``LowRankOptimizer`` restores dict-valued
    state as saved. The factor is computed on the device, without a host synchronisation.

    A zero update (an all-zero gradient, a frozen layer's step) leaves the history as it was,
    and a zero history (only zero updates so far) limits nothing, as before the first step.
    Departure from fira and apollo-torch, which store the 0 and then cap every later update at
    ``γ^k · 1e-8`` — an optimizer switched off for thousands of steps.

    With ``reduce`` (``update`` is one rank's rows, ``RuleInputs.reduce_grad``) the norm is the
    whole update's, so every rank applies the same factor.
    """
    norm = matrix_norm(update, reduce)
    if key in state:
        previous = state[key]["norm"]
        factor = (gamma * (previous + RATIO_EPS) / norm).clamp(max=1.0)
        factor = torch.where((previous > 0) & (norm > 0), factor, torch.ones_like(factor))
        update.mul_(factor.to(update.dtype))
        norm = torch.where(norm > 0, norm * factor, previous)
    state[key] = {"norm": norm}
    return update


def limiter_layout(grad: Tensor, key: str, gamma: float | None) -> dict[str, Any]:
    """The state :func:`limit_growth_` keeps under ``key`` for an update shaped like ``grad``
    (an ``UpdateRule.state_layout``): one norm per matrix — 0-dim for a weight, E×1×1 for a stack
    of E experts; none without a limiter (``gamma`` None)."""
    return {} if gamma is None else {key: {"norm": matrix_norm(grad)}}
