"""The Quantizer contract: a tensor to a packed, tensor-only form and back (DESIGN.md §2)."""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor

Packed = dict[str, Tensor]
"""A quantized tensor: a dict of tensors only (codes, scales, shape, ...), so it saves with
``torch.save`` and travels in optimizer state dicts as is."""

ROUNDING = ("nearest", "stochastic")


class Quantizer(ABC):
    """Quantizes tensors of any role (projection basis, optimizer moments, weights).

    Args:
        bits: bit width of the codes.
        group_size: elements that share one scale (quantizer-specific meaning; -1 = per row).
        rounding: ``"nearest"`` or ``"stochastic"`` (unbiased: ``E[dequantize(quantize(x))] = x``).
    """

    def __init__(self, bits: int = 8, group_size: int = 256, rounding: str = "nearest") -> None:
        if rounding not in ROUNDING:
            raise ValueError(f"unknown rounding {rounding!r}; expected one of {ROUNDING}")
        self.bits = bits
        self.group_size = group_size
        self.rounding = rounding

    @abstractmethod
    def quantize(self, tensor: Tensor) -> Packed:
        """Pack ``tensor`` (any shape, floating point)."""

    @abstractmethod
    def dequantize(self, packed: Packed) -> Tensor:
        """The float32 tensor that ``packed`` encodes, in its original shape."""
