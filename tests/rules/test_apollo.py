"""APOLLO and APOLLO-Mini: against a plain reference written here, against apollo-torch on
identical inputs when it happens to be installed (it is CC-BY-NC and never a dependency), and
the scaling in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lit_lowrank import LowRankOptimizer, Side
from lit_lowrank.projectors.random import RandomProjector
from lit_lowrank.projectors.svd import SVDProjector
from lit_lowrank.rules.apollo import ApolloMiniRule, ApolloRule
from lit_lowrank.rules.base import RuleInputs
from references import AdamMoments


def reference_apollo(weight, grads, *, index, rank, gap, scale, lr, betas, eps, gamma, tensorwise):
    """APOLLO, Alg. 1 of Zhu et al. 2024 (bias-corrected Adam, √scale as in apollo-torch),
    with the k-th Gaussian drawn by PCG64 seeded with SeedSequence([index, k])."""
    m_rows, n_cols = weight.shape
    right = m_rows >= n_cols
    adam, basis, previous = AdamMoments(betas, eps), None, None
    trajectory = []
    for t, grad in enumerate(grads, start=1):
        if (t - 1) % gap == 0:
            generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence([index, (t - 1) // gap])))
            draw = generator.standard_normal((rank, n_cols if right else m_rows), dtype=np.float32)
            basis = torch.from_numpy(draw).T.to(grad.dtype) / math.sqrt(rank)
        low = grad @ basis if right else basis.T @ grad
        direction = adam.direction(low, t)
        if tensorwise:
            ratio = direction.norm() / (low.norm() + 1e-8)
        else:
            axis = 1 if right else 0
            ratio = direction.norm(dim=axis, keepdim=True) / (low.norm(dim=axis, keepdim=True) + 1e-8)
        update = grad * ratio
        norm = update.norm()
        if previous is not None and norm > gamma * previous:
            update = update * (gamma * previous / norm)
            norm = gamma * previous
        previous = norm
        weight = weight - lr * math.sqrt(scale) * update
        trajectory.append(weight)
    return trajectory


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
@pytest.mark.parametrize("scaling", ["channel", "tensor"])
def test_apollo_matches_reference(shape, scaling):
    torch.manual_seed(0)
    options = dict(rank=4, gap=3, scale=2.0, lr=0.01, betas=(0.9, 0.95), eps=1e-8, gamma=1.01)
    other = nn.Parameter(torch.zeros(3))  # index 0, so the weight's seed is 1
    weight = nn.Parameter(torch.randn(*shape, dtype=torch.float64))
    grads = [torch.randn(*shape, dtype=torch.float64) * (1 + 0.5 * (t % 3)) for t in range(8)]
    expected = reference_apollo(weight.detach().clone(), grads, index=1, tensorwise=scaling == "tensor", **options)
    optimizer = LowRankOptimizer(
        [{"params": [other]}, {"params": [weight], "lowrank": True}], lr=options["lr"], betas=options["betas"],
        eps=options["eps"], rank=options["rank"], update_gap=options["gap"], scale=options["scale"],
        projector="random", rule="apollo", rule_args={"scaling": scaling},
    )
    for grad, want in zip(grads, expected):
        weight.grad = grad
        optimizer.step()
        torch.testing.assert_close(weight.detach(), want, rtol=0, atol=1e-8)


@pytest.mark.parametrize("policy", ["reverse_std", "left", "right"])
def test_channel_axis_follows_the_projected_side(policy):
    """apollo-torch takes the channel axis from the gradient's shape, which breaks for these
    sides; here it follows the projector: one ratio per column (left) or per row (right)."""
    grad = torch.randn(12, 7, dtype=torch.float64)
    projector = RandomProjector(3, side=policy, seed=5)
    projector.refresh(grad)
    low = projector.project(grad)
    direction = torch.randn_like(low)
    param = torch.zeros_like(grad)
    ApolloRule(scale=1.0).apply_(param, RuleInputs(grad, low, direction, projector, {}), step_size=1.0)
    ratio = -param / grad
    if projector.side == Side.LEFT:  # R is r×n: one ratio per column
        expected = direction.norm(dim=0) / (low.norm(dim=0) + 1e-8)
        torch.testing.assert_close(ratio, expected.expand(12, 7))
    else:  # R is m×r: one ratio per row
        expected = direction.norm(dim=1, keepdim=True) / (low.norm(dim=1, keepdim=True) + 1e-8)
        torch.testing.assert_close(ratio, expected.expand(12, 7))


def test_apollo_mini_first_step_in_closed_form():
    """Step 1 of Adam gives N = R/(|R| + ε) ≈ sign(R): the update is lr·√128·(√(#R)/‖R‖)·G."""
    grad = torch.randn(9, 14, dtype=torch.float64)
    weight = nn.Parameter(torch.zeros_like(grad))
    optimizer = LowRankOptimizer([{"params": [weight], "lowrank": True}], lr=0.1, eps=1e-12, rank=1,
                                 projector="random", rule="apollo-mini", scale=0.25)  # scale does not reach mini
    weight.grad = grad
    optimizer.step()
    low = optimizer.projectors[weight].project(grad)
    expected = -0.1 * math.sqrt(128) * math.sqrt(low.numel()) / low.norm() * grad
    torch.testing.assert_close(weight.detach(), expected)


def test_apollo_mini_refuses_rank_above_one_when_built():
    """Refused before any step (no data or model set-up is wasted), naming the fix."""
    weight = nn.Parameter(torch.zeros(6, 5))
    with pytest.raises(ValueError, match=r"'apollo-mini' .* works at rank 1 only, but rank is 2; set rank: 1"):
        LowRankOptimizer([{"params": [weight], "lowrank": True}], rank=2, projector="random", rule="apollo-mini")
    LowRankOptimizer([{"params": [weight], "lowrank": True}], rank=1, projector="random", rule="apollo-mini")


def test_options_are_validated():
    with pytest.raises(ValueError, match="expected one of"):
        ApolloRule(scaling="row")
    with pytest.raises(ValueError, match="gamma"):
        ApolloMiniRule(gamma=0.5)


def test_full_side_needs_tensorwise_scaling():
    grad = torch.randn(8, 6)
    projector = SVDProjector(2, side="full")
    projector.refresh(grad)
    low = projector.project(grad)
    with pytest.raises(ValueError, match="tensor-wise"):
        ApolloRule().apply_(torch.zeros_like(grad), RuleInputs(grad, low, low, projector, {}), step_size=1.0)
    param = torch.zeros_like(grad)
    ApolloRule(scaling="tensor").apply_(param, RuleInputs(grad, low, low, projector, {}), step_size=1.0)
    torch.testing.assert_close(param, -grad)  # N = R: ratio 1 (up to the 1e-8 guard)


# ----------------------------------------------------------------------------- apollo-torch
@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_trajectory_matches_apollo_torch(scale_type, uncorrected_adam, apollo_torch_draws_ours,
                                         assert_same_trajectory):
    """Same math where the peer's convention is matched: its HF-style Adam with
    ``correct_bias=False`` ↔ the in-test uncorrected inner optimizer; side ``std`` only (its
    channel axis is derived from the gradient's shape)."""
    apollo_torch = pytest.importorskip("apollo_torch")
    apollo_torch_draws_ours(rank=4)

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(20, 40, bias=False), nn.Tanh(), nn.Linear(40, 12, bias=False), nn.Tanh(),
                             nn.Linear(12, 6, bias=False))

    ours_model, peer_model = mlp(), mlp()
    options = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)
    ours = LowRankOptimizer([{"params": list(ours_model.parameters()), "lowrank": True}], rank=4, update_gap=3,
                            scale=4.0, projector="random", rule="apollo", rule_args={"scaling": scale_type},
                            inner=uncorrected_adam, **options)
    peer = apollo_torch.APOLLOAdamW(
        [{"params": list(peer_model.parameters()), "rank": 4, "proj": "random", "scale_type": scale_type,
          "update_proj_gap": 3, "scale": 4.0, "proj_type": "std"}], correct_bias=False, **options)
    assert_same_trajectory(ours_model, ours, peer_model, peer, outputs=6)
