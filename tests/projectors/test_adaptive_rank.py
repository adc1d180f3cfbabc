"""Adaptive rank: the smallest rank holding τ of the gradient's energy (checked against numpy's
SVD), capped per layer and by the shared budget, logged per layer and restored on resume."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from lit_lowrank import LowRankOptimizer
from lit_lowrank.projectors import adaptive_rank
from lit_lowrank.projectors.adaptive_rank import AdaptiveRankProjector, granted_ranks, reset_budget


@pytest.fixture
def budget_key(request):
    key = request.node.name
    reset_budget(key)
    yield key
    reset_budget(key)


def numpy_tau_rank(grad: torch.Tensor, tau: float) -> int:
    energy = np.linalg.svd(grad.numpy(), compute_uv=False) ** 2
    return int(np.argmax(np.cumsum(energy) / energy.sum() >= tau)) + 1


def gradient(m: int, n: int, decay: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=generator, dtype=torch.float64))
    return u @ torch.diag(decay ** torch.arange(min(m, n), dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("tau", [0.5, 0.8, 0.9, 0.99])
@pytest.mark.parametrize("decay", [0.5, 0.8])
def test_rank_is_the_smallest_holding_tau_of_the_energy(tau, decay, budget_key):
    grad = gradient(40, 30, decay, seed=0)
    projector = AdaptiveRankProjector(30, tau=tau, budget_key=budget_key)
    projector.refresh(grad)
    want = numpy_tau_rank(grad, tau)
    assert projector.rank == projector.tau_rank == want
    assert projector.project(grad).shape == (40, want)
    sigma = np.linalg.svd(grad.numpy(), compute_uv=False)
    assert projector.energy == pytest.approx((sigma[:want] ** 2).sum() / (sigma**2).sum())
    assert projector.energy >= tau > (sigma[: want - 1] ** 2).sum() / (sigma**2).sum()


def test_rank_is_capped_per_layer(budget_key):
    projector = AdaptiveRankProjector(4, tau=0.99, budget_key=budget_key)
    projector.refresh(gradient(40, 30, 0.9, seed=0))
    assert projector.tau_rank > 4 and projector.rank == 4


def test_global_budget_is_respected_and_logged(budget_key, caplog):
    grads = [gradient(40, 30, decay, seed=s) for s, decay in enumerate((0.7, 0.6, 0.5))]
    wants = [numpy_tau_rank(g, 0.95) for g in grads]
    budget = sum(wants) - 2
    projectors = [AdaptiveRankProjector(30, seed=i, tau=0.95, budget=budget, budget_key=budget_key) for i in range(3)]
    with caplog.at_level(logging.INFO, logger=adaptive_rank.__name__), pytest.warns(UserWarning, match="exhausted"):
        for projector, grad in zip(projectors, grads):
            projector.refresh(grad)
    ranks = [p.rank for p in projectors]
    assert ranks == [wants[0], wants[1], wants[2] - 2]
    assert sum(ranks) == budget and granted_ranks(budget_key) == {0: ranks[0], 1: ranks[1], 2: ranks[2]}
    assert [f"layer {i}: rank {r}" in caplog.text for i, r in enumerate(ranks)] == [True] * 3
    projectors[0].refresh(grads[0])  # later refreshes keep the rank (the moments are shaped by it)
    assert projectors[0].rank == ranks[0]


def test_rank_survives_resume_in_the_optimizer(budget_key):
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(30, 20, dtype=torch.float64))
    options = dict(rank=12, projector="adaptive-rank", projector_args={"tau": 0.9, "budget_key": budget_key})
    optimizer = LowRankOptimizer([{"params": [weight], "lowrank": True}], **options)
    weight.grad = gradient(30, 20, 0.7, seed=3)
    optimizer.step()
    rank = optimizer.projectors[weight].rank
    assert rank == numpy_tau_rank(weight.grad, 0.9) < 12
    assert optimizer.state[weight]["exp_avg"].shape == (30, rank)
    resumed = LowRankOptimizer([{"params": [weight], "lowrank": True}], **options)
    resumed.load_state_dict(optimizer.state_dict())
    weight.grad = gradient(30, 20, 0.7, seed=4)
    resumed.step()  # moments of shape (30, rank) still fit
    assert resumed.projectors[weight].rank == rank


def test_options_are_validated():
    with pytest.raises(ValueError, match="tau"):
        AdaptiveRankProjector(4, tau=1.5)
    with pytest.raises(ValueError, match="min_rank"):
        AdaptiveRankProjector(4, min_rank=5)


def test_an_all_zero_first_gradient_keeps_the_maximum_rank(budget_key):
    projector = AdaptiveRankProjector(6, tau=0.5, budget=10, budget_key=budget_key)
    with pytest.warns(UserWarning, match="all zero"):
        projector.refresh(torch.zeros(40, 30, dtype=torch.float64))
    assert projector.rank == 6 and granted_ranks(budget_key) == {0: 6}
    grad = gradient(40, 30, 0.5, seed=0)
    projector.refresh(grad)
    assert projector.project(grad).shape == (40, 6)
