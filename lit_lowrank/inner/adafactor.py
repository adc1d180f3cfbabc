"""Adafactor in low-rank space (Shazeer & Stern 2018, "Adafactor: Adaptive Learning Rates with
Sublinear Memory Cost", Alg. 4 with update clipping; GaLore-Adafactor, Zhao et al. 2024 §4).

The second moment of the projected gradient ``R`` (a×b: m×r for a right projection, r×n for a
left one) is kept factored as one row statistic (a) and one column statistic (b), so the state
is ``r + max(m, n)`` floats per weight instead of Adam's ``2·r·max(m, n)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.inner.base import InnerOptimizer, change_basis


class AdafactorInner(InnerOptimizer):
    """Per weight, with ``t`` the step and ``β̂2ₜ = 1 − t^decay_rate``:

    * ``row ← β̂2ₜ row + (1 − β̂2ₜ) mean_cols(R² + ε1)``;
      ``col ← β̂2ₜ col + (1 − β̂2ₜ) mean_rows(R² + ε1)``;
    * ``V̂ = row colᵀ / mean(row)`` (the rank-1 estimate of the EMA of ``R²``, Alg. 4);
    * ``U = R / √V̂``, clipped: ``U ← U / max(1, RMS(U) / d)`` with ``d = clip_threshold``;
    * with ``beta1``: ``M ← β1 M + (1 − β1) U`` and ``N = M``; else ``N = U``.

    This is ``transformers.optimization.Adafactor`` (and galore-torch's ``GaLoreAdafactor``)
    with ``relative_step=False, scale_parameter=False`` — the setting of the GaLore paper's
    Adafactor runs. **The learning rate is the optimizer's ``lr``**, an absolute step size:
    ``W ← W − lr · α · lift(N)`` (with warm-up/cosine from the LR scheduler). Adafactor's
    relative step ``min(1e-2, 1/√t)`` and its parameter-RMS scaling are not offered, because the
    inner update sees only ``R`` — schedule ``lr`` instead. HF scales ``U`` by ``lr`` *before*
    the first-moment EMA; here ``lr`` multiplies ``N`` afterwards, which is the same for a
    constant ``lr`` and averages unscaled updates when the schedule changes ``lr``.

    Args:
        beta1: first-moment decay, or ``None`` (default, no first moment: the factored
            statistics are the whole state). The optimizer's ``betas`` do not reach it.
        decay_rate: exponent of ``β̂2ₜ`` (−0.8).
        clip_threshold: ``d``, the RMS bound of the unscaled update (1.0).
        eps1: ``ε1`` added to ``R²`` (1e-30, Adafactor's ε₁); the optimizer's ``eps`` does not
            reach it.

    State: ``exp_avg_sq_row`` (a), ``exp_avg_sq_col`` (b) and, with ``beta1``, ``exp_avg`` (R's
    shape); float32 (float64 for float64 gradients).
    """

    linear_state = ("exp_avg",)

    def __init__(self, *, beta1: float | None = None, decay_rate: float = -0.8, clip_threshold: float = 1.0,
                 eps1: float = 1e-30) -> None:
        if beta1 is not None and not 0.0 <= beta1 < 1.0:
            raise ValueError(f"beta1 must be in [0, 1) or None, got {beta1}")
        if decay_rate >= 0:
            raise ValueError(f"decay_rate must be < 0 (β̂2ₜ = 1 − t^decay_rate), got {decay_rate}")
        if clip_threshold <= 0:
            raise ValueError(f"clip_threshold must be > 0, got {clip_threshold}")
        self.beta1 = beta1
        self.decay_rate = decay_rate
        self.clip_threshold = clip_threshold
        self.eps1 = eps1

    def init_state(self, low: Tensor) -> dict[str, Tensor]:
        rows, cols = low.shape
        dtype = compute_dtype(low)
        state = {"exp_avg_sq_row": low.new_zeros(rows, dtype=dtype), "exp_avg_sq_col": low.new_zeros(cols, dtype=dtype)}
        if self.beta1 is not None:
            state["exp_avg"] = torch.zeros_like(low, dtype=dtype)
        return state

    @torch.no_grad()
    def directions(self, lows: list[Tensor], states: list[dict[str, Tensor]], step: int) -> list[Tensor]:
        beta2t = 1.0 - step**self.decay_rate
        return [self._direction(low, state, beta2t) for low, state in zip(lows, states)]

    def _direction(self, low: Tensor, state: dict[str, Tensor], beta2t: float) -> Tensor:
        grad = low.to(compute_dtype(low))
        squared = grad.square().add_(self.eps1)
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        row.mul_(beta2t).add_(squared.mean(dim=1), alpha=1 - beta2t)
        col.mul_(beta2t).add_(squared.mean(dim=0), alpha=1 - beta2t)
        update = rsqrt_second_moment(row, col).mul_(grad)
        rms = torch.linalg.vector_norm(update) / update.numel() ** 0.5
        update.div_((rms / self.clip_threshold).clamp_(min=1.0))
        if self.beta1 is not None:
            update = state["exp_avg"].lerp_(update, 1 - self.beta1).clone()
        return update.to(low.dtype)

    def rotate(self, state: dict[str, Tensor], left: Tensor | None, right: Tensor | None) -> None:
        """Maps the first moment exactly (``L M Rᵀ``) and the factored estimate
        ``V̂ = row colᵀ / mean(row)`` with the squared maps, ``V̂' = (L∘L) V̂ (R∘R)ᵀ``: the result is still rank one, so it is stored
        exactly — ``row' = (L∘L) row``, ``col' = (R∘R) col · mean(row') / mean(row)``. Only the
        statistic of the projected dimension changes (the rows of an r×n ``R``, the columns of
        an m×r one); the other is indexed by the weight's own rows or columns.

        After ``on_refresh: reset`` the statistics restart at zero but ``t`` does not, so the first updates
        average with weight ``t^decay_rate`` and are bounded by the RMS clipping.
        """
        if "exp_avg" in state:
            maps = (None if m is None else m.to(state["exp_avg"].dtype) for m in (left, right))
            state["exp_avg"].copy_(change_basis(state["exp_avg"], *maps))
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        old_mean = row.mean()
        if left is not None:
            row.copy_(left.to(row.dtype).square() @ row)
        if right is not None:
            col.copy_(right.to(col.dtype).square() @ col)
        col.mul_(row.mean() / old_mean.clamp(min=torch.finfo(row.dtype).tiny))


def compute_dtype(low: Tensor) -> torch.dtype:
    """float32, or float64 for a float64 ``R``: half-precision statistics would underflow
    (``R² + 1e-30``); HF's Adafactor likewise casts 16-bit gradients to float32."""
    return torch.promote_types(low.dtype, torch.float32)


def rsqrt_second_moment(row: Tensor, col: Tensor) -> Tensor:
    """``1 / √V̂`` for ``V̂ = row colᵀ / mean(row)`` (a×b), without forming ``V̂``."""
    return (row / row.mean()).rsqrt().unsqueeze(1) * col.rsqrt().unsqueeze(0)


@hookimpl
def register_inner_optimizers(register) -> None:
    register("adafactor", AdafactorInner)
