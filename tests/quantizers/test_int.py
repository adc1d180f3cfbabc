"""The `int` quantizer: round-trip bounds from the packed scales, unbiased stochastic rounding,
dense bit packing (real storage bytes)."""

from __future__ import annotations

import math

import pytest
import torch

from lit_lowrank import get_quantizer
from lit_lowrank.quantizers.int import IntQuantizer


def storage_bytes(packed: dict[str, torch.Tensor]) -> int:
    """Bytes of the storages behind the packed tensors (catches views of larger buffers)."""
    return sum(t.untyped_storage().nbytes() for t in packed.values())


def group_index(shape: torch.Size, group_size: int) -> torch.Tensor:
    """The group of each element of the flattened tensor."""
    length = shape[-1] if group_size == -1 else group_size
    return torch.arange(shape.numel()) // length


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [64, 100, -1])
def test_nearest_round_trip_within_half_a_step(bits, symmetric, group_size):
    torch.manual_seed(bits)
    x = torch.randn(37, 53) * torch.linspace(0.1, 3, 53)  # groups with different ranges
    quantizer = IntQuantizer(bits=bits, group_size=group_size, symmetric=symmetric)
    packed = quantizer.quantize(x)
    error = (quantizer.dequantize(packed) - x).abs().flatten()
    scales = packed["scales"][group_index(x.shape, group_size)]
    assert (error <= scales / 2 * (1 + 1e-5)).all()
    # the scale is the grid step of the group's range: ((hi - lo) or 2·absmax) / levels
    groups = x.flatten()[: (x.numel() // 64) * 64].view(-1, 64) if group_size == 64 else None
    if groups is not None:
        if symmetric:
            expected = groups.abs().amax(1) / (2 ** (bits - 1) - 1)
        else:
            expected = (groups.amax(1) - groups.amin(1)) / (2**bits - 1)
        torch.testing.assert_close(packed["scales"][: len(expected)], expected)


def test_all_positive_group_is_not_clamped():
    """q-galore-torch clamps the integer zero point of an all-positive group and loses its values."""
    x = torch.linspace(1.0, 2.0, 256)
    quantizer = IntQuantizer(bits=4, group_size=256)
    packed = quantizer.quantize(x)
    assert (quantizer.dequantize(packed) - x).abs().max() <= packed["scales"][0] / 2 + 1e-7


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_stochastic_rounding_is_unbiased(bits):
    torch.manual_seed(0)
    x = torch.randn(512)
    quantizer = IntQuantizer(bits=bits, group_size=128, rounding="stochastic")
    draws = 2000
    generator = torch.Generator().manual_seed(1)
    samples = torch.stack([quantizer.dequantize(quantizer.quantize(x, generator=generator)) for _ in range(draws)])
    scales = quantizer.quantize(x)["scales"][group_index(x.shape, 128)]
    # one draw is x̂ = s·(⌊y⌋ + Bernoulli(frac y)) + min, y = (x − min)/s: variance s²·p(1−p)
    mins = quantizer.quantize(x)["mins"][group_index(x.shape, 128)]
    y = (x - mins) / scales
    frac = y - y.floor()
    std_of_mean = scales * (frac * (1 - frac)).sqrt() / math.sqrt(draws)
    deviation = (samples.mean(0) - x).abs()
    assert (deviation <= 5 * std_of_mean + 1e-6).all()  # 5σ per element
    # and it is not nearest rounding in disguise: the draws really spread over two codes
    assert (samples.std(0) > 0).float().mean() > 0.9


def test_stochastic_rounding_reproducible_with_generator():
    x = torch.randn(300)
    quantizer = IntQuantizer(bits=4, group_size=64, rounding="stochastic")
    a = quantizer.quantize(x, generator=torch.Generator().manual_seed(3))
    b = quantizer.quantize(x, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_storage_is_half_of_int8(symmetric):
    x = torch.randn(256, 512)
    int8 = IntQuantizer(bits=8, group_size=256, symmetric=symmetric).quantize(x)
    int4 = IntQuantizer(bits=4, group_size=256, symmetric=symmetric).quantize(x)
    int2 = IntQuantizer(bits=2, group_size=256, symmetric=symmetric).quantize(x)
    assert int8["codes"].untyped_storage().nbytes() == x.numel()
    assert int4["codes"].untyped_storage().nbytes() == x.numel() // 2
    assert int2["codes"].untyped_storage().nbytes() == x.numel() // 4
    # the per-group metadata is the same at both widths, so the totals differ by exactly numel/2
    assert storage_bytes(int8) - storage_bytes(int4) == x.numel() // 2
    groups = x.numel() // 256
    assert storage_bytes(int4) == x.numel() // 2 + 4 * groups * (1 if symmetric else 2) + 8 * x.ndim


def test_odd_sizes_pack_and_unpack():
    x = torch.randn(3, 7)  # 21 elements: partial group, odd code count
    for bits in (2, 3, 4):
        quantizer = IntQuantizer(bits=bits, group_size=8)
        packed = quantizer.quantize(x)
        assert quantizer.dequantize(packed).shape == x.shape
        error = (quantizer.dequantize(packed) - x).abs().flatten()
        assert (error <= packed["scales"][group_index(x.shape, 8)] / 2 + 1e-6).all()


def test_registered_and_validates():
    assert get_quantizer("int") is IntQuantizer
    with pytest.raises(ValueError, match="2..8 bits"):
        IntQuantizer(bits=1)
    with pytest.raises(ValueError, match="rounding"):
        IntQuantizer(rounding="up")
    with pytest.raises(ValueError, match="group_size"):
        IntQuantizer(group_size=0)
