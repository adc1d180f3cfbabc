"""The Quantizer contract: a tensor to a packed, tensor-only form and back (docs/plugins.md)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
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


class QuantizerProbeError(ValueError):
    """A quantizer failed its round-trip probe (:func:`probe_round_trip`); ``name`` is its
    registered name, so the optimizer can name the plugin that provides it."""

    def __init__(self, name: str, problem: str, *, provider: str | None = None, fix: str = "") -> None:
        source = f" (from {provider})" if provider else ""
        super().__init__(f"quantizer {name!r}{source} fails its round-trip probe: {problem}{fix}")
        self.name = name
        self.problem = problem


PROBE_SHAPE = (8, 32)
"""Shape of the probe tensor: not square, so a transposed or flattened round trip shows."""
MIN_COSINE = 0.5
"""The least cosine similarity between a Gaussian tensor and its round trip; one bit per entry
with a sign and a scale already reaches √(2/π) ≈ 0.8, zeros or noise reach about 0."""


def probe_round_trip(quantizer: Quantizer, name: str) -> Quantizer:
    """Check ``x̂ = dequantize(quantize(x))`` on a small fixed Gaussian ``x`` (CPU, float32):
    ``x̂`` must have ``x``'s shape, be finite and satisfy ``max|x̂ − x| ≤ 2·max|x|``, which any
    rounding onto a grid inside the data's range ``[−max|x|, max|x|]`` meets, stochastic or
    not, at any bit width, and follow ``x`` (cosine similarity ≥ :data:`MIN_COSINE`), which a
    quantizer returning zeros or noise does not. Returns ``quantizer``; raises
    :class:`QuantizerProbeError` naming ``name``, its registered name."""
    x = torch.randn(PROBE_SHAPE, generator=torch.Generator().manual_seed(0))
    try:
        restored = quantizer.dequantize(quantizer.quantize(x.clone()))
    except Exception as exc:  # a plugin's bug, reported with its name below
        raise QuantizerProbeError(name, f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(restored, Tensor) or tuple(restored.shape) != PROBE_SHAPE:
        shape = tuple(restored.shape) if isinstance(restored, Tensor) else type(restored).__name__
        raise QuantizerProbeError(name, f"a {PROBE_SHAPE} tensor came back as {shape}")
    restored = restored.detach().float().cpu()
    if not torch.isfinite(restored).all():
        raise QuantizerProbeError(name, "the round trip of a finite tensor has NaN or infinite values")
    error, bound = (restored - x).abs().max().item(), 2 * x.abs().max().item()
    if error > bound * (1 + 1e-6):
        raise QuantizerProbeError(name, f"it errs by up to {error:.3g}, beyond 2·max|x| = {bound:.3g} "
                                        "(its values leave the data's range)")
    cosine = torch.nn.functional.cosine_similarity(restored.flatten(), x.flatten(), dim=0).item()
    if cosine < MIN_COSINE:
        raise QuantizerProbeError(name, f"the round trip does not follow its input (cosine similarity {cosine:.2f} < "
                                        f"{MIN_COSINE}: zeros or noise come back), so nothing it packs would train")
    return quantizer
