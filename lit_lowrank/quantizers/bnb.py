"""8-bit blockwise dynamic quantization through bitsandbytes (Dettmers et al. 2022, "8-bit
Optimizers via Block-wise Quantization"), the format of 8-bit Adam moments.

Each block of ``block_size`` elements is normalised by its absmax and every value is mapped
to one of 256 entries of the *dynamic* code (a signed or unsigned dynamic-exponent table,
``bitsandbytes.functional.create_dynamic_map``), deterministically. bitsandbytes' own kernels
do the work (its functional API runs on CPU and CUDA); the code table is a function of
``signed`` and is not stored per tensor.

The mapping is nearest-code only approximately: bitsandbytes' CPU kernel searches the table
with fixed thresholds and, with bitsandbytes 0.50, gives about 0.2 % (signed) to 0.3 %
(unsigned) of Gaussian values a code other than the nearest, at most ~3e-5 of the block absmax
farther than the nearest one (``tests/quantizers/test_bnb.py`` bounds it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_lowrank.extras import require
from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.quantizers.base import Packed, Quantizer

_CODES: dict[tuple[bool, torch.device], Tensor] = {}


def dynamic_code(signed: bool, device: torch.device) -> Tensor:
    """bitsandbytes' 256-entry dynamic map (float32), cached per signedness and device."""
    key = (signed, torch.device(device))
    if key not in _CODES:
        from bitsandbytes.functional import create_dynamic_map

        _CODES[key] = create_dynamic_map(signed=signed).to(device)
    return _CODES[key]


class BnbBlockwise8bit(Quantizer):
    """``codes ≈ argmin_k |code[k] − x / absmax(block)|`` per block (uint8; bitsandbytes' kernel
    may miss the nearest code by a hair, see the module doc), ``absmax`` per block.

    Args:
        bits: must be 8 (the dynamic code has 256 entries).
        group_size: the block size, one of bitsandbytes' sizes (64 … 4096; 256 as in bnb's
            8-bit Adam moments on the GPU).
        rounding: ``"nearest"`` only: deterministic (bitsandbytes' blockwise kernels), nearest
            up to the kernel's table search.
        signed: the signed map for first moments; the unsigned one (finer near 0) for
            non-negative second moments, as bitsandbytes' ``Adam8bit`` does.

    Packed keys: ``codes`` (uint8, numel), ``absmax`` (float32, one per block), ``shape``.
    Bytes: ``numel + 4·⌈numel / group_size⌉`` — a quarter of float32 plus the block scales.
    """

    BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)

    def __init__(self, bits: int = 8, group_size: int = 256, rounding: str = "nearest", signed: bool = True) -> None:
        require("bnb", "bitsandbytes")
        super().__init__(bits=bits, group_size=group_size, rounding=rounding)
        if bits != 8:
            raise ValueError(f"bnb-8bit quantizes to 8 bits only, got bits={bits}; use `int` for other widths")
        if group_size not in self.BLOCK_SIZES:
            raise ValueError(f"bnb-8bit block size must be one of {self.BLOCK_SIZES}, got {group_size}")
        if rounding != "nearest":
            raise ValueError("bnb-8bit rounds to nearest only; use the `int` quantizer for stochastic rounding")
        self.signed = signed

    def quantize(self, tensor: Tensor) -> Packed:
        from bitsandbytes.functional import quantize_blockwise

        flat = tensor.detach().float().contiguous().flatten()
        codes, state = quantize_blockwise(flat, code=dynamic_code(self.signed, flat.device), blocksize=self.group_size)
        return {"codes": codes, "absmax": state.absmax, "shape": torch.tensor(tensor.shape, dtype=torch.int64)}

    def dequantize(self, packed: Packed) -> Tensor:
        from bitsandbytes.functional import dequantize_blockwise

        codes = packed["codes"]
        flat = dequantize_blockwise(codes, absmax=packed["absmax"], code=dynamic_code(self.signed, codes.device),
                                    blocksize=self.group_size)
        return flat.float().view(torch.Size(packed["shape"].tolist()))


@hookimpl
def register_quantizers(register) -> None:
    register("bnb-8bit", BnbBlockwise8bit)
