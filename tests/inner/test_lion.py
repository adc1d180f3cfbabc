"""Lion inner optimizer: GaLore-Lion against a plain reference written here (Chen et al. 2023,
Program 1, in the projected space), rotation of its moment, state bytes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_lowrank import LowRankOptimizer
from lit_lowrank.inner.lion import LionInner


def reference_galore_lion(weight, grads, *, rank, gap, scale, lr, betas, weight_decay):
    """Right projection (m ≥ n): R = G Q, Q the top-r right singular vectors, refreshed every gap."""
    beta1, beta2 = betas
    momentum = basis = None
    trajectory = []
    for t, grad in enumerate(grads):
        if t % gap == 0:
            basis = torch.linalg.svd(grad, full_matrices=False)[2][:rank].T
        low = grad @ basis
        if momentum is None:
            momentum = torch.zeros_like(low)
        direction = torch.sign(beta1 * momentum + (1 - beta1) * low)
        momentum = beta2 * momentum + (1 - beta2) * low
        weight = weight - lr * (scale * direction @ basis.T + weight_decay * weight)
        trajectory.append(weight)
    return trajectory


@pytest.mark.parametrize("betas, inner_args", [
    ((0.9, 0.99), {}),  # nobody sets betas: Lion's own defaults, not AdamW's (0.9, 0.999)
    ((0.8, 0.95), {"betas": (0.8, 0.95)}),
])
def test_trajectory_matches_reference(betas, inner_args):
    torch.manual_seed(0)
    options = dict(rank=4, gap=3, scale=0.25, lr=1e-3, betas=betas, weight_decay=0.3)
    weight = nn.Parameter(torch.randn(24, 16, dtype=torch.float64))
    grads = [torch.randn(24, 16, dtype=torch.float64) for _ in range(7)]
    expected = reference_galore_lion(weight.detach().clone(), grads, **options)
    optimizer = LowRankOptimizer([{"params": [weight], "lowrank": True}], lr=options["lr"],
                                 weight_decay=options["weight_decay"], rank=4, update_gap=3, scale=0.25,
                                 inner="lion", inner_args=inner_args)
    assert tuple(optimizer.param_groups[0]["betas"]) == betas  # the group shows the betas in use
    for grad, want in zip(grads, expected):
        weight.grad = grad
        optimizer.step()
        torch.testing.assert_close(weight.detach(), want, rtol=0, atol=1e-12)


def test_directions_are_signs_of_interpolation_and_momentum_uses_beta2():
    inner = LionInner(betas=(0.8, 0.5))
    low = torch.randn(5, 3)
    state = inner.init_state(low)
    state["exp_avg"].copy_(torch.randn(5, 3))
    momentum = state["exp_avg"].clone()
    (direction,) = inner.directions([low], [state], 1)
    torch.testing.assert_close(direction, torch.sign(0.8 * momentum + 0.2 * low))
    torch.testing.assert_close(state["exp_avg"], 0.5 * momentum + 0.5 * low)
    assert set(direction.abs().unique().tolist()) == {1.0}


def test_optimizer_betas_reach_lion_unless_inner_args_set_them():
    weight = nn.Parameter(torch.randn(8, 4))
    offered = LowRankOptimizer([{"params": [weight], "lowrank": True}], betas=(0.9, 0.95), inner="lion")
    explicit = LowRankOptimizer([{"params": [weight], "lowrank": True}], betas=(0.9, 0.95), inner="lion",
                                inner_args={"betas": (0.9, 0.99)})
    assert offered._group_components(offered.param_groups[0])[0].betas == (0.9, 0.95)
    assert explicit._group_components(explicit.param_groups[0])[0].betas == (0.9, 0.99)
    with pytest.raises(ValueError, match="betas"):
        LionInner(betas=(0.9, 1.0))


def test_state_bytes_and_rotation():
    """One moment of R's shape: r·max(m, n) floats; rotate maps it like R (L M Rᵀ); Lion's own
    β2 = 0.99 weighs the new R."""
    m, n, r = 48, 16, 4
    weight = nn.Parameter(torch.randn(m, n))
    optimizer = LowRankOptimizer([{"params": [weight], "lowrank": True}], rank=r, inner="lion", update_gap=1,
                                 on_refresh="rotate")
    weight.grad = torch.randn(m, n)
    optimizer.step()
    assert optimizer.state_bytes()["moments"] == 4 * r * max(m, n)
    state = optimizer.state[weight]
    before, old_basis = state["exp_avg"].clone(), optimizer.projectors[weight].bases()[1]
    weight.grad = torch.randn(m, n)
    low = weight.grad @ torch.linalg.svd(weight.grad)[2][:r].T
    optimizer.step()
    new_basis = optimizer.projectors[weight].bases()[1]
    rotated = before @ (new_basis.T @ old_basis).T
    torch.testing.assert_close(state["exp_avg"], rotated.lerp(low, 0.01), atol=1e-5, rtol=1e-4)
