"""Fira: trajectory parity with the fira package (where the math is the same), the paper's
unscaled residual against a plain reference written here, and the residual in closed form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_lowrank import LowRankOptimizer
from lit_lowrank.projectors.svd import SVDProjector
from lit_lowrank.rules.base import RuleInputs
from lit_lowrank.rules.fira import FiraRule
from references import AdamMoments, svd_basis

fira = pytest.importorskip("fira")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 40, bias=False), nn.Tanh(), nn.Linear(40, 12, bias=False), nn.Tanh(),
                         nn.Linear(12, 6, bias=False))


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_trajectory_matches_fira_package(proj_type, uncorrected_adam, assert_same_trajectory):
    """fira 1.0.2 subtracts the α-scaled lift (``scaled_residual=True``) and uses HF AdamW's
    convention (``correct_bias=False`` ↔ the in-test uncorrected inner optimizer)."""
    ours_model, peer_model = _mlp(), _mlp()
    options = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)
    ours = LowRankOptimizer([{"params": list(ours_model.parameters()), "lowrank": True}], rank=4, update_gap=3,
                            scale=0.25, side=proj_type, rule="fira", rule_args={"scaled_residual": True},
                            inner=uncorrected_adam, **options)
    peer = fira.FiraAdamW([{"params": list(peer_model.parameters()), "rank": 4, "update_proj_gap": 3,
                            "alpha": 0.25, "proj_type": proj_type}],
                          correct_bias=False, no_deprecation_warning=True, **options)
    assert_same_trajectory(ours_model, ours, peer_model, peer, outputs=6)


def reference_fira(weight, grads, *, rank, gap, scale, lr, betas, eps, gamma, right):
    """Fira, Alg. 1 of Chen et al. 2024 with bias-corrected Adam, one weight, step by step."""
    adam, basis, previous = AdamMoments(betas, eps), None, None
    trajectory, limited = [], 0
    for t, grad in enumerate(grads, start=1):
        if (t - 1) % gap == 0:
            basis = svd_basis(grad, rank, right)
        low = grad @ basis if right else basis.T @ grad
        direction = adam.direction(low, t)
        lift = (lambda x: x @ basis.T) if right else (lambda x: basis @ x)
        if right:  # one ratio per row of G
            phi = direction.norm(dim=1, keepdim=True) / (low.norm(dim=1, keepdim=True) + 1e-8)
        else:  # one ratio per column of G
            phi = direction.norm(dim=0, keepdim=True) / (low.norm(dim=0, keepdim=True) + 1e-8)
        residual = phi * (grad - lift(low))
        norm = residual.norm()
        if previous is not None and norm > gamma * previous:
            residual = residual * (gamma * previous / norm)
            norm = gamma * previous
            limited += 1
        previous = norm
        weight = weight - lr * (scale * lift(direction) + residual)
        trajectory.append(weight)
    return trajectory, limited


@pytest.mark.parametrize("shape,side", [((24, 16), "std"), ((16, 24), "std"), ((24, 16), "left"),
                                        ((16, 24), "right")])
def test_unscaled_residual_matches_reference(shape, side):
    torch.manual_seed(0)
    options = dict(rank=4, gap=3, scale=0.25, lr=0.01, betas=(0.9, 0.95), eps=1e-8, gamma=1.01)
    weight = nn.Parameter(torch.randn(*shape, dtype=torch.float64))
    # growing gradients, so the limiter acts on some steps and not on others
    grads = [torch.randn(*shape, dtype=torch.float64) * (1 + 0.5 * (t % 3)) for t in range(9)]
    right = shape[0] >= shape[1] if side == "std" else side == "right"
    expected, limited = reference_fira(weight.detach().clone(), grads, right=right, **options)
    assert 0 < limited < len(grads) - 1
    optimizer = LowRankOptimizer([{"params": [weight], "lowrank": True}], lr=options["lr"], betas=options["betas"],
                                 eps=options["eps"], rank=options["rank"], update_gap=options["gap"],
                                 scale=options["scale"], side=side, rule="fira")
    for grad, want in zip(grads, expected):
        weight.grad = grad
        optimizer.step()
        torch.testing.assert_close(weight.detach(), want, rtol=0, atol=1e-8)


@pytest.mark.parametrize("scaled_residual", [False, True])
def test_residual_in_closed_form(scaled_residual):
    """Inside the subspace the update is α·N plus, for fira's scaled residual, the leaked
    (1 − α)·φ·R; outside it is φ·(G − lift R) either way (one step, limiter not yet active)."""
    torch.manual_seed(1)
    grad, direction = torch.randn(10, 30, dtype=torch.float64), torch.randn(3, 30, dtype=torch.float64)
    projector = SVDProjector(3, side="left")
    projector.refresh(grad)
    low = projector.project(grad)
    rule = FiraRule(scale=0.25, scaled_residual=scaled_residual)
    param = torch.zeros_like(grad)
    rule.apply_(param, RuleInputs(grad, low, direction, projector, {}), step_size=1.0)
    update = -param
    basis = projector.bases()[0]
    phi = direction.norm(dim=0) / low.norm(dim=0)
    leaked = 0.75 * phi * low if scaled_residual else torch.zeros_like(low)
    torch.testing.assert_close(basis.T @ update, 0.25 * direction + leaked)
    outside = grad - basis @ low
    torch.testing.assert_close(update - basis @ (basis.T @ update), phi * outside)


def test_limiter_caps_growth_at_gamma():
    grad = torch.randn(8, 6, dtype=torch.float64)
    projector = SVDProjector(2, side="right")
    projector.refresh(grad)
    low = projector.project(grad)
    rule, state = FiraRule(scale=1.0, gamma=1.01), {}
    param = torch.zeros_like(grad)
    rule.apply_(param, RuleInputs(grad, low, low, projector, state), step_size=1.0)
    first = state["limiter_norm"]["norm"].item()
    rule.apply_(param, RuleInputs(10 * grad, 10 * low, 10 * low, projector, state), step_size=1.0)
    assert state["limiter_norm"]["norm"].item() == pytest.approx(1.01 * first)


def test_full_side_is_refused_with_the_fix():
    grad = torch.randn(8, 6)
    projector = SVDProjector(2, side="full")
    projector.refresh(grad)
    low = projector.project(grad)
    with pytest.raises(ValueError, match="one-sided projection"):
        FiraRule().apply_(torch.zeros_like(grad), RuleInputs(grad, low, low, projector, {}), step_size=1.0)
