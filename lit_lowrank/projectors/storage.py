"""How a dense-basis projector keeps its bases between steps: as plain tensors in the gradient's
dtype, or packed by a quantizer and dequantized on use (Q-GaLore's INT4 basis)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lit_lowrank.quantizers.base import Packed, Quantizer, probe_round_trip

Stored = Tensor | Packed


class BasisStorage:
    """Packs a basis (d×r) for storage and unpacks it for use.

    Args:
        quantizer: a :class:`~lit_lowrank.Quantizer` class (the optimizer resolves registered
            names such as ``int``), or None for plain storage.
        quantizer_args: its keyword arguments, e.g. ``{"bits": 4, "group_size": 256}``.

    The quantizer gets a round-trip probe when built
    (:func:`~lit_lowrank.quantizers.base.probe_round_trip`).

    A quantized basis is packed transposed (r×d, row-major), so quantization groups run along
    the basis vectors: when ``group_size`` divides d each group lies within one vector and every
    vector gets its own scales; otherwise a group spans the end of one vector and the start of
    the next (``⌈r·d / group_size⌉`` groups in all). q-galore-torch groups the r×n or m×r matrix
    as stored, which on the left side mixes all r vectors in every group.
    """

    def __init__(self, quantizer: type[Quantizer] | None = None, quantizer_args: dict[str, Any] | None = None,
                 ) -> None:
        if quantizer is None and quantizer_args:
            raise ValueError(f"quantizer_args {quantizer_args} given without a quantizer; set `quantizer` too")
        self.quantizer = None
        if quantizer is not None:  # probed once here: a broken plugin fails now, not as a NaN loss
            self.quantizer = probe_round_trip(quantizer(**(quantizer_args or {})), quantizer.__name__)
        self.dtype: torch.dtype | None = None

    def pack(self, basis: Tensor | None, dtype: torch.dtype) -> Stored | None:
        """Keep ``basis`` (d×r, float32 or float64) for use in ``dtype`` (the gradient's)."""
        self.dtype = dtype
        if basis is None:
            return None
        if self.quantizer is None:  # contiguous: a resumed basis then multiplies bitwise as the saved one did
            return basis.to(dtype).contiguous()
        return self.quantizer.quantize(basis.T)

    def unpack(self, stored: Stored | None) -> Tensor | None:
        """The d×r basis in the gradient's dtype."""
        if stored is None or isinstance(stored, Tensor):
            return stored
        return self.quantizer.dequantize(stored).to(self.dtype).T

    def state(self, key: str, stored: Stored | None) -> dict[str, Tensor]:
        """Flat, tensor-only state entries for one basis (``key``, or ``key.<field>`` if packed)."""
        if stored is None:
            return {}
        if isinstance(stored, Tensor):
            return {key: stored}
        return {**{f"{key}.{field}": t for field, t in stored.items()}, "dtype": torch.empty(0, dtype=self.dtype)}

    def load(self, key: str, state: dict[str, Tensor]) -> Stored | None:
        if self.quantizer is None:
            return state.get(key)
        prefix = f"{key}."
        packed = {k[len(prefix):]: t for k, t in state.items() if k.startswith(prefix)}
        if not packed:
            return None
        self.dtype = state["dtype"].dtype
        return packed
