"""Adam with 8-bit blockwise moments in low-rank space (Dettmers et al. 2022, "8-bit Optimizers
via Block-wise Quantization"; GaLore-8bit, Zhao et al. 2024 §4; GradNormLoRP 8-bit).

Between steps each moment of a low-rank tensor ``R`` is stored as uint8 codes of bitsandbytes'
dynamic map plus one float32 absmax per block (quantizer ``bnb-8bit`` by default): the
first moment with the signed map, the non-negative second moment with the unsigned one, as
``bitsandbytes.optim.Adam8bit`` does. A step dequantizes, applies Adam's update in float32,
computes ``N`` from the float32 moments, and requantizes them for storage — so ``N`` carries
only the error of the *stored* moments of earlier steps, never of this step's update.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.inner.base import InnerOptimizer, bias_corrections, zeros_like_state
from lit_lowrank.quantizers.base import Packed, Quantizer, probe_round_trip
from lit_lowrank.quantizers.bnb import BnbBlockwise8bit


class Adam8bitInner(InnerOptimizer):
    """``M ← β1 M + (1-β1) R``; ``V ← β2 V + (1-β2) R²``; ``N = M̂ / (√V̂ + ε)`` with M, V kept
    8-bit blockwise between steps.

    Args:
        betas, eps: as :class:`~lit_lowrank.inner.adamw.AdamInner`.
        block_size: elements per absmax scale (bitsandbytes' 8-bit optimizers use 256).
        min_8bit_size: low-rank tensors with fewer elements keep float moments, as
            bitsandbytes' ``min_8bit_size`` (4096): for them the scales and the error outweigh
            the bytes saved.
        quantizer: the moment quantizer's class (the optimizer resolves a registered name in
            ``inner_args``); it must accept ``group_size`` and ``signed`` (``bnb-8bit`` does).

    State bytes per quantized moment of ``k`` elements: ``k + 4·⌈k / block_size⌉`` (plus the
    packed shape, 8 bytes per dimension) — a quarter of float32 plus the block scales.
    """

    linear_state = ("exp_avg",)
    quadratic_state = ("exp_avg_sq",)

    def __init__(
        self,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        block_size: int = 256,
        min_8bit_size: int = 4096,
        quantizer: type[Quantizer] = BnbBlockwise8bit,
    ) -> None:
        self.betas = tuple(betas)
        self.eps = eps
        self.min_8bit_size = min_8bit_size
        self.quantizers: dict[str, Quantizer] = {  # each probed: a broken plugin fails now, not as a NaN loss
            "exp_avg": probe_round_trip(quantizer(group_size=block_size, signed=True), quantizer.__name__),
            "exp_avg_sq": probe_round_trip(quantizer(group_size=block_size, signed=False), quantizer.__name__),
        }

    def quantized(self, low: Tensor) -> bool:
        """Whether moments of a tensor shaped like ``low`` are stored in 8 bits."""
        return low.numel() >= self.min_8bit_size

    def init_state(self, low: Tensor) -> dict[str, Tensor | Packed]:
        if not self.quantized(low):
            return zeros_like_state(low, "exp_avg", "exp_avg_sq")
        zeros = torch.zeros(low.shape, dtype=torch.float32, device=low.device)
        return {key: quantizer.quantize(zeros) for key, quantizer in self.quantizers.items()}

    def load(self, state: dict, key: str) -> Tensor:
        """The float32 value of moment ``key`` (dequantized if stored packed)."""
        value = state[key]
        return self.quantizers[key].dequantize(value) if isinstance(value, dict) else value.float()

    def store(self, state: dict, key: str, value: Tensor) -> None:
        if isinstance(state[key], dict):
            state[key] = self.quantizers[key].quantize(value)
        else:
            state[key].copy_(value)

    @torch.no_grad()
    def directions(self, lows: list[Tensor], states: list[dict], step: int) -> list[Tensor]:
        beta1, beta2 = self.betas
        correction1, correction2 = bias_corrections(self.betas, step)
        directions = []
        for low, state in zip(lows, states):
            grad = low.float()
            exp_avg = self.load(state, "exp_avg").lerp_(grad, 1 - beta1)
            exp_avg_sq = self.load(state, "exp_avg_sq").mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = exp_avg_sq.sqrt().div_(math.sqrt(correction2)).add_(self.eps)
            directions.append(exp_avg.div(denom).div_(correction1).to(low.dtype))
            self.store(state, "exp_avg", exp_avg)
            self.store(state, "exp_avg_sq", exp_avg_sq)
        return directions

    def rotate(self, state: dict, left: Tensor | None, right: Tensor | None) -> None:
        """As :meth:`InnerOptimizer.rotate`, applied to the dequantized moments."""
        floats = {key: self.load(state, key) for key in self.quantizers}
        super().rotate(floats, left, right)
        for key, value in floats.items():
            self.store(state, key, value)


@hookimpl
def register_inner_optimizers(register) -> None:
    register("adamw8bit", Adam8bitInner)
