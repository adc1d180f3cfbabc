"""Group-wise uniform integer quantization, 2–8 bits (Q-GaLore's INT4 basis and INT8 weights).

A tensor is flattened and cut into groups of ``group_size`` consecutive elements; each group
gets its own scale ``s`` (and, asymmetric, an offset: the group minimum):

* symmetric:  ``s = max|x| / (2^(b-1) - 1)``, ``q = round(x / s)`` in ``[-(2^(b-1)-1), 2^(b-1)-1]``;
  ``x̂ = s · q``;
* asymmetric: ``s = (max x − min x) / (2^b − 1)``, ``q = round((x − min x) / s)`` in
  ``[0, 2^b − 1]``, ``x̂ = s · q + min x`` (Q-GaLore's min-max scheme, with the group minimum
  kept as a float offset instead of q-galore-torch's rounded integer zero point, which
  clamps all-positive groups and biases stochastic rounding at the range ends).

In both, the grid spans exactly the group's range, so nearest rounding errs by at most
``s/2`` elementwise, and stochastic rounding ``⌊y⌋ + [u < y − ⌊y⌋]``, ``u ~ U[0, 1)``, needs
no clamping and is unbiased: ``E[x̂] = x`` (Q-GaLore §3.4: small weight updates survive in
expectation).

Codes are stored unsigned; widths that divide 8 (2, 4, 8 bits) are packed densely —
``8 / bits`` codes per byte, so an INT4 tensor really takes half the bytes of an INT8 one.
Other widths (3, 5, 6, 7 bits) take one byte per code: their memory is that of 8 bits.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.quantizers.base import Packed, Quantizer

MIN_BITS, MAX_BITS = 2, 8
_TINY = 1e-12  # floor for scales of constant groups, so x / s stays finite


class IntQuantizer(Quantizer):
    """Group-wise symmetric or asymmetric ``bits``-bit integer quantizer.

    Args:
        bits: code width, 2–8.
        group_size: consecutive elements (of the flattened tensor) sharing one scale; ``-1``
            uses one group per row (last dimension). The last group is padded by repeating
            its final element, which leaves its range unchanged.
        rounding: ``"nearest"`` or ``"stochastic"``.
        symmetric: absmax scaling (True) or min-max scaling with a per-group offset (False,
            as Q-GaLore's code does for bases and weights).

    Packed keys: ``codes`` (uint8, packed), ``scales`` (float32, one per group), ``mins``
    (float32, asymmetric only), ``shape`` (int64).
    """

    def __init__(
        self, bits: int = 8, group_size: int = 256, rounding: str = "nearest", symmetric: bool = False
    ) -> None:
        super().__init__(bits=bits, group_size=group_size, rounding=rounding)
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"int quantizer takes {MIN_BITS}..{MAX_BITS} bits, got {bits}")
        if group_size < 1 and group_size != -1:
            raise ValueError(f"group_size must be >= 1 or -1 (per row), got {group_size}")
        self.symmetric = symmetric
        self.per_byte = 8 // bits if 8 % bits == 0 else 1

    # ------------------------------------------------------------------ public
    def quantize(self, tensor: Tensor, generator: torch.Generator | np.random.Generator | None = None) -> Packed:
        """Pack ``tensor`` (any shape). ``generator`` drives stochastic rounding: a torch
        generator on ``tensor``'s device, or a NumPy one (noise drawn on the CPU, then moved)."""
        groups = self._groups(tensor.detach().float())  # (g, group_size)
        scales, mins = self._scales(groups)
        scaled = groups / scales if mins is None else (groups - mins) / scales
        codes = self._round(scaled, generator).clamp_(*self._code_range())  # clamp: float error only
        if mins is None:  # store signed codes with an offset, so packing sees unsigned values
            codes += 2 ** (self.bits - 1)
        packed = {"codes": self._pack(codes.to(torch.uint8).flatten()), "scales": scales.flatten(),
                  "shape": torch.tensor(tensor.shape, dtype=torch.int64)}
        if mins is not None:
            packed["mins"] = mins.flatten()
        return packed

    def dequantize(self, packed: Packed) -> Tensor:
        shape = torch.Size(packed["shape"].tolist())
        scales = packed["scales"].unsqueeze(1)
        length = scales.shape[0] * self._group_length(shape)
        codes = self._unpack(packed["codes"])[:length].view(scales.shape[0], -1).float()
        mins = packed.get("mins")
        if mins is None:
            values = (codes - 2 ** (self.bits - 1)) * scales
        else:
            values = torch.addcmul(mins.unsqueeze(1), codes, scales)
        return values.flatten()[: shape.numel()].view(shape)

    # ------------------------------------------------------------------ groups and scales
    def _groups(self, tensor: Tensor) -> Tensor:
        flat = tensor.flatten()
        if flat.numel() == 0:
            raise ValueError("cannot quantize an empty tensor")
        size = self._group_length(tensor.shape)
        pad = -flat.numel() % size
        if pad:
            flat = torch.cat([flat, flat[-1:].expand(pad)])
        return flat.view(-1, size)

    def _group_length(self, shape: torch.Size) -> int:
        return (shape[-1] if len(shape) else 1) if self.group_size == -1 else self.group_size

    def _scales(self, groups: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.symmetric:
            top = groups.abs().amax(dim=1, keepdim=True)
            return (top / (2 ** (self.bits - 1) - 1)).clamp_(min=_TINY), None
        low, high = groups.aminmax(dim=1, keepdim=True)
        return ((high - low) / (2**self.bits - 1)).clamp_(min=_TINY), low

    def _code_range(self) -> tuple[int, int]:
        if self.symmetric:
            top = 2 ** (self.bits - 1) - 1
            return -top, top
        return 0, 2**self.bits - 1

    def _round(self, scaled: Tensor, generator: torch.Generator | np.random.Generator | None) -> Tensor:
        if self.rounding == "nearest":
            return scaled.round_()
        if isinstance(generator, np.random.Generator):
            noise = torch.from_numpy(generator.random(tuple(scaled.shape), dtype=np.float32)).to(scaled.device)
        else:
            noise = torch.rand(scaled.shape, generator=generator, device=scaled.device)
        return scaled.add_(noise).floor_()  # ⌊y + u⌋ = ⌊y⌋ + [u ≥ 1 − frac(y)]: P(up) = frac(y)

    # ------------------------------------------------------------------ bit packing
    def _pack(self, codes: Tensor) -> Tensor:
        """``per_byte`` codes per byte, the first one in the lowest bits (zero-padded to whole bytes)."""
        if self.per_byte == 1:
            return codes.contiguous()
        lanes = torch.nn.functional.pad(codes.to(torch.int32), (0, -codes.numel() % self.per_byte))
        lanes = lanes.view(-1, self.per_byte)
        shifts = torch.arange(self.per_byte, device=codes.device, dtype=torch.int32) * self.bits
        return (lanes << shifts).sum(dim=1).to(torch.uint8)

    def _unpack(self, packed: Tensor) -> Tensor:
        if self.per_byte == 1:
            return packed
        shifts = torch.arange(self.per_byte, device=packed.device, dtype=torch.int32) * self.bits
        lanes = (packed.to(torch.int32).unsqueeze(1) >> shifts) & (2**self.bits - 1)
        return lanes.flatten().to(torch.uint8)


@hookimpl
def register_quantizers(register) -> None:
    register("int", IntQuantizer)
