"""The quantizer round-trip probe run when the optimizer is built refuses a quantizer whose round
trip keeps the shape and the range but not the values (zeros, noise): every basis or moment it
packed would be lost, and no weight would move."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_lowrank import LowRankOptimizer, hookimpl
from lit_lowrank.quantizers.base import MIN_COSINE, QuantizerProbeError, probe_round_trip
from lit_lowrank.quantizers.int import IntQuantizer


class ZeroQuantizer(IntQuantizer):
    def dequantize(self, packed):
        return torch.zeros_like(super().dequantize(packed))


class NoiseQuantizer(IntQuantizer):
    """Codes of a fresh Gaussian of the input's scale: within 2·max|x|, unrelated to x."""

    def dequantize(self, packed):
        restored = super().dequantize(packed)
        noise = torch.randn(restored.shape, generator=torch.Generator().manual_seed(7))
        return (noise * restored.std()).clamp(-restored.abs().max(), restored.abs().max())


@pytest.mark.parametrize("cls", [ZeroQuantizer, NoiseQuantizer])
def test_a_round_trip_that_loses_the_values_fails_the_probe(cls):
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))  # the probe's input
    restored = cls().dequantize(cls().quantize(x))
    cosine = nn.functional.cosine_similarity(restored.flatten(), x.flatten(), dim=0).item()
    assert (restored - x).abs().max() <= 2 * x.abs().max() and cosine < MIN_COSINE  # passes the range check only
    with pytest.raises(QuantizerProbeError, match=rf"does not follow its input \(cosine similarity {cosine:.2f}"):
        probe_round_trip(cls(), "broken")


def test_a_zero_basis_quantizer_is_refused_when_the_optimizer_is_built(fresh_plugins):
    class Plugin:
        @hookimpl
        def register_quantizers(self, register):
            register("zeros", ZeroQuantizer)

    fresh_plugins.register_plugin(Plugin(), name="lit-lowrank-zeros")
    weight = torch.zeros(16, 8, requires_grad=True)
    with pytest.raises(ValueError, match=r"quantizer 'zeros' \(from lit-lowrank-zeros\) fails its round-trip probe: "
                                         r"the round trip does not follow its input"):
        LowRankOptimizer([{"params": [weight], "lowrank": True}], rank=4, projector_args={"quantizer": "zeros"})


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_coarsest_working_quantizer_still_passes(symmetric):
    quantizer = IntQuantizer(bits=2, rounding="stochastic", symmetric=symmetric)
    assert probe_round_trip(quantizer, "int") is quantizer
