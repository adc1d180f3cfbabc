"""Quantizers: group-wise integer, 8-bit blockwise (bitsandbytes), used for bases, moments, weights."""

from lit_lowrank.quantizers.base import Packed, Quantizer

__all__ = ["Packed", "Quantizer"]
