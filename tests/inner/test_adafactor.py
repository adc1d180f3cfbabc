"""Adafactor inner optimizer: the update of transformers' Adafactor on the same tensors, the
trajectory of galore-torch's GaLoreAdafactor, the factored-state rotation, state bytes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.optimization import Adafactor

from lit_lowrank import LowRankOptimizer
from lit_lowrank.inner.adafactor import AdafactorInner


def gradients(shape, steps, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator, dtype=dtype)
    return [base + 0.5 * torch.randn(shape, generator=generator, dtype=dtype) for _ in range(steps)]


@pytest.mark.parametrize("shape", [(24, 4), (4, 24)])  # R of a right (m×r) and a left (r×n) projection
@pytest.mark.parametrize("beta1", [None, 0.9])
def test_directions_equal_hf_adafactor_update(shape, beta1):
    """With lr = 1 and relative_step/scale_parameter off, HF's step moves a parameter by exactly
    the direction N (its lr-scaled update); feed both the same R_t."""
    lows = gradients(shape, 6)
    lows[2] = lows[2] * 50  # a spike, so that update clipping is active on some steps
    param = nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    reference = Adafactor([param], lr=1.0, beta1=beta1, relative_step=False, scale_parameter=False,
                          warmup_init=False)
    inner = AdafactorInner(beta1=beta1)
    state = inner.init_state(lows[0])
    clipped = 0
    for step, low in enumerate(lows, start=1):
        before = param.detach().clone()
        param.grad = low.clone()
        reference.step()
        expected = before - param.detach()
        (direction,) = inner.directions([low], [state], step)
        torch.testing.assert_close(direction, expected, rtol=1e-10, atol=1e-12)
        clipped += bool(direction.square().mean().sqrt() > 1 - 1e-9) and beta1 is None
    assert beta1 is not None or clipped >= 1  # the clipping branch was exercised


@pytest.mark.parametrize("shape", [(32, 16), (16, 32)])
@pytest.mark.parametrize("beta1", [None, 0.5])
def test_trajectory_matches_galore_adafactor(shape, beta1):
    """galore-torch's GaLoreAdafactor with relative_step=False, scale_parameter=False (the
    GaLore paper's setting): SVD every 3 steps, α = 0.25, decoupled decay before the update.
    Same math; only the SVD's signs may differ, to which the update is invariant."""
    galore_torch = pytest.importorskip("galore_torch")
    torch.manual_seed(0)
    start = torch.randn(shape)
    grads = gradients(shape, 8, dtype=torch.float32, seed=1)
    ours, theirs = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    lr, decay = 0.01, 0.1
    optimizer = LowRankOptimizer([{"params": [ours], "lowrank": True}], lr=lr, weight_decay=decay, rank=4,
                                 update_gap=3, scale=0.25, inner="adafactor", inner_args={"beta1": beta1})
    reference = galore_torch.GaLoreAdafactor(
        [{"params": [theirs], "rank": 4, "update_proj_gap": 3, "scale": 0.25, "proj_type": "std"}],
        lr=lr, weight_decay=decay, beta1=beta1, relative_step=False, scale_parameter=False, warmup_init=False)
    for grad in grads:
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        optimizer.step()
        reference.step()
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.equal(ours.detach(), start)


def test_rotate_maps_factored_estimate_exactly():
    """After ``rotate`` the stored row/col statistics reconstruct (L∘L) V̂ (R∘R)ᵀ, V̂ = row colᵀ/mean(row)."""
    inner = AdafactorInner(beta1=0.9)
    low = torch.randn(6, 5, dtype=torch.float64)
    state = inner.init_state(low)
    for step, grad in enumerate(gradients((6, 5), 3), start=1):
        inner.directions([grad], [state], step)
    estimate = torch.outer(state["exp_avg_sq_row"], state["exp_avg_sq_col"]) / state["exp_avg_sq_row"].mean()
    exp_avg = state["exp_avg"].clone()
    left = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))[0]
    inner.rotate(state, left, right)
    rotated = torch.outer(state["exp_avg_sq_row"], state["exp_avg_sq_col"]) / state["exp_avg_sq_row"].mean()
    torch.testing.assert_close(rotated, left.square() @ estimate @ right.square().T)
    torch.testing.assert_close(state["exp_avg"], left @ exp_avg @ right.T)
    inner.rotate(state, None, right)  # one-sided map: the other statistic unchanged
    row = state["exp_avg_sq_row"].clone()
    inner.rotate(state, None, right)
    torch.testing.assert_close(state["exp_avg_sq_row"], row)


def test_state_bytes_are_factored():
    """``r + max(m, n)`` float32 numbers per weight (no first moment), vs Adam's 2·r·max(m, n)."""
    m, n, r = 48, 16, 4
    weight = nn.Parameter(torch.randn(m, n))
    optimizer = LowRankOptimizer([{"params": [weight], "lowrank": True}], rank=r, inner="adafactor")
    weight.grad = torch.randn(m, n)
    optimizer.step()
    assert optimizer.state_bytes()["moments"] == 4 * (r + max(m, n))


def test_invalid_options_name_the_fix():
    with pytest.raises(ValueError, match="decay_rate"):
        AdafactorInner(decay_rate=0.8)
    with pytest.raises(TypeError, match="accepts: beta1"):
        LowRankOptimizer([{"params": [nn.Parameter(torch.randn(4, 4))], "lowrank": True}], inner="adafactor",
                         inner_args={"betas": (0.9, 0.99)})
