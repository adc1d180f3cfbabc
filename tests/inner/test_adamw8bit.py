"""8-bit Adam inner optimizer: a plain bitsandbytes reference, the fp32 AdamInner within a bound
derived from the dynamic map's resolution, real state bytes, and exact resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
from bitsandbytes.functional import create_dynamic_map, dequantize_blockwise, quantize_blockwise
from torch import nn

from lit_lowrank import LowRankOptimizer, get_inner_optimizer

BETAS, EPS, BLOCK = (0.9, 0.999), 1e-8, 256
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def gradients(shape, steps, seed=0):
    """Correlated gradients (a fixed direction plus noise), as in training."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    return [base + 0.5 * torch.randn(shape, generator=generator) for _ in range(steps)]


def reference_adam8bit(lows):
    """Dequantize → Adam update in float32 → N → requantize, with bitsandbytes' functional API."""
    beta1, beta2 = BETAS
    codes = {signed: create_dynamic_map(signed=signed).to(lows[0].device) for signed in (True, False)}

    def roundtrip(x, signed):
        packed, state = quantize_blockwise(x.flatten(), code=codes[signed], blocksize=BLOCK)
        return dequantize_blockwise(packed, absmax=state.absmax, code=codes[signed], blocksize=BLOCK).view(x.shape)

    m = v = torch.zeros_like(lows[0])
    out = []
    for t, low in enumerate(lows, start=1):
        m = beta1 * m + (1 - beta1) * low
        v = beta2 * v + (1 - beta2) * low * low
        out.append((m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + EPS))
        m, v = roundtrip(m, True), roundtrip(v, False)
    return out


def half_gap(signed: bool) -> float:
    """Largest rounding error of the dynamic map, relative to the block's absmax."""
    return create_dynamic_map(signed=signed).sort().values.diff().max().item() / 2


def block_max(x):
    """Each element's block absmax (blocks of BLOCK consecutive elements, as bitsandbytes)."""
    flat = x.flatten()
    padded = torch.cat([flat, flat.new_zeros(-flat.numel() % BLOCK)])
    return padded.view(-1, BLOCK).amax(1).repeat_interleave(BLOCK)[: flat.numel()].view(x.shape)


def fp32_adam_with_bounds(lows):
    """float64 Adam directions and an interval that holds any Adam whose stored moments are
    rounded each step with error ≤ h · block absmax (h from the map): the errors decay with β
    like the moments, e_t = β (e_{t-1} + h · blockmax(|m_{t-1}| + e_{t-1}))."""
    beta1, beta2 = BETAS
    h_m, h_v = half_gap(True), half_gap(False)
    m = v = err_m = err_v = torch.zeros_like(lows[0], dtype=torch.float64)
    out = []
    for t, low in enumerate(lows, start=1):
        if t > 1:
            err_m = beta1 * (err_m + h_m * block_max(m.abs() + err_m))
            err_v = beta2 * (err_v + h_v * block_max(v.abs() + err_v))
        low = low.double()
        m = beta1 * m + (1 - beta1) * low
        v = beta2 * v + (1 - beta2) * low * low
        c1, c2 = 1 - beta1**t, 1 - beta2**t
        nums = ((m - err_m) / c1, (m + err_m) / c1)
        dens = (((v - err_v).clamp(min=0) / c2).sqrt() + EPS, ((v + err_v) / c2).sqrt() + EPS)
        ratios = torch.stack([a / b for a in nums for b in dens])
        out.append((m / c1 / ((v / c2).sqrt() + EPS), ratios.min(0).values, ratios.max(0).values))
    return out


def run_inner(inner, lows):
    state = inner.init_state(lows[0])
    return [inner.directions([low], [state], t)[0] for t, low in enumerate(lows, start=1)], state


def make_inner(**kwargs):
    return get_inner_optimizer("adamw8bit")(betas=BETAS, eps=EPS, block_size=BLOCK, **kwargs)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_matches_plain_bitsandbytes_reference(device):
    lows = [low.to(device) for low in gradients((64, 128), steps=6)]
    directions, state = run_inner(make_inner(), lows)
    for got, want in zip(directions, reference_adam8bit(lows)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert state["exp_avg"]["codes"].dtype == torch.uint8 and state["exp_avg"]["codes"].device == lows[0].device


def test_within_quantization_bound_of_fp32_adam():
    lows = gradients((64, 128), steps=12)
    directions, _ = run_inner(make_inner(), lows)
    fp32, _ = run_inner(get_inner_optimizer("adamw")(betas=BETAS, eps=EPS), lows)
    torch.testing.assert_close(directions[0], fp32[0])  # no stored moment yet: exactly Adam
    for got, (exact, low, high) in zip(directions, fp32_adam_with_bounds(lows)):
        slack = 1e-5 * (exact.abs() + 1)
        assert ((got.double() >= low - slack) & (got.double() <= high + slack)).all()
    assert not torch.equal(directions[-1], fp32[-1])  # the moments really are rounded


def test_small_tensors_keep_float_moments():
    inner = make_inner()
    state = inner.init_state(torch.zeros(8, 16))
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg"].shape == (8, 16)
    lows = gradients((8, 16), steps=3)
    directions, _ = run_inner(inner, lows)
    fp32, _ = run_inner(get_inner_optimizer("adamw")(betas=BETAS, eps=EPS), lows)
    for got, want in zip(directions, fp32):
        torch.testing.assert_close(got, want)


def lowrank_optimizer(weight, inner, rank=32):
    return LowRankOptimizer([{"params": [weight], "lowrank": True}], lr=1e-3, betas=BETAS, eps=EPS,
                            rank=rank, update_gap=3, inner=inner, inner_args={"block_size": BLOCK} if inner == "adamw8bit" else {})


def test_state_bytes_are_a_quarter_of_fp32_plus_block_scales():
    shape, rank = (512, 256), 32  # std side: low-rank moments are 512×32
    states = {}
    for inner in ("adamw", "adamw8bit"):
        weight = nn.Parameter(torch.zeros(shape))
        optimizer = lowrank_optimizer(weight, inner, rank)
        weight.grad = gradients(shape, 1)[0]
        optimizer.step()
        states[inner] = (optimizer.state_bytes()["moments"], optimizer.state[weight])
    elements = shape[0] * rank
    scales = 4 * math.ceil(elements / BLOCK)
    shape_bytes = 8 * 2
    fp32_bytes, _ = states["adamw"]
    bytes8, state8 = states["adamw8bit"]
    assert fp32_bytes == 2 * 4 * elements
    assert bytes8 == 2 * (elements + scales + shape_bytes) == fp32_bytes // 4 + 2 * (scales + shape_bytes)
    storage = sum(t.untyped_storage().nbytes() for key in ("exp_avg", "exp_avg_sq") for t in state8[key].values())
    assert storage == bytes8


@pytest.mark.parametrize("on_refresh", ["keep", "reset", "rotate"])
def test_resume_is_exact(on_refresh):
    torch.manual_seed(0)
    grads = gradients((96, 64), steps=8, seed=1)

    def fresh():
        weight = nn.Parameter(torch.randn(96, 64, generator=torch.Generator().manual_seed(2)))
        optimizer = LowRankOptimizer([{"params": [weight], "lowrank": True}], lr=1e-2, rank=64,
                                     update_gap=3, inner="adamw8bit", on_refresh=on_refresh)
        return weight, optimizer

    weight, optimizer = fresh()
    for grad in grads[:4]:
        weight.grad = grad
        optimizer.step()
    buffer = io.BytesIO()
    torch.save({"weight": weight.detach().clone(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_weight, resumed = fresh()
    with torch.no_grad():
        resumed_weight.copy_(saved["weight"])
    resumed.load_state_dict(saved["optimizer"])
    assert resumed.state[resumed_weight]["exp_avg"]["codes"].dtype == torch.uint8
    for grad in grads[4:]:
        for w, opt in ((weight, optimizer), (resumed_weight, resumed)):
            w.grad = grad.clone()
            opt.step()
    assert torch.equal(weight, resumed_weight)


def test_reset_on_refresh_restarts_quantized_moments():
    """``on_refresh: reset`` restarts the moments from ``init_state``: after the refresh step they
    hold that step's update only, still packed (written out here: M = (1−β1)·R, V = (1−β2)·R²)."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 128))
    optimizer = LowRankOptimizer([{"params": [weight], "lowrank": True}], rank=64, update_gap=2,
                                 on_refresh="reset", inner="adamw8bit", inner_args={"min_8bit_size": 1})
    for _ in range(3):  # refreshes at steps 0 and 2
        weight.grad = torch.randn(64, 128)
        optimizer.step()
    state, inner = optimizer.state[weight], optimizer._group_components(optimizer.param_groups[0])[0]
    low = optimizer.projectors[weight].project(weight.grad)
    assert state["exp_avg"]["codes"].dtype == torch.uint8
    torch.testing.assert_close(inner.load(state, "exp_avg"), 0.1 * low, atol=0.1 * low.abs().max() / 60, rtol=0)
    torch.testing.assert_close(inner.load(state, "exp_avg_sq"), 0.001 * low.square(),
                               atol=0.001 * low.square().max() / 60, rtol=0)
