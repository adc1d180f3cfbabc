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
from lit_lowrank.projectors.adaptive_rank import AdaptiveRankProjector


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
def test_rank_is_the_smallest_holding_tau_of_the_energy(tau, decay):
    grad = gradient(40, 30, decay, seed=0)
    projector = AdaptiveRankProjector(30, tau=tau)
    projector.refresh(grad)
    want = numpy_tau_rank(grad, tau)
    assert projector.rank == projector.tau_rank == want
    assert projector.project(grad).shape == (40, want)
    sigma = np.linalg.svd(grad.numpy(), compute_uv=False)
    assert projector.energy == pytest.approx((sigma[:want] ** 2).sum() / (sigma**2).sum())
    assert projector.energy >= tau > (sigma[: want - 1] ** 2).sum() / (sigma**2).sum()


def test_rank_is_capped_per_layer():
    projector = AdaptiveRankProjector(4, tau=0.99)
    projector.refresh(gradient(40, 30, 0.9, seed=0))
    assert projector.tau_rank > 4 and projector.rank == 4


def test_global_budget_is_respected_and_logged(caplog):
    grads = [gradient(40, 30, decay, seed=s) for s, decay in enumerate((0.7, 0.6, 0.5))]
    wants = [numpy_tau_rank(g, 0.95) for g in grads]
    budget = sum(wants) - 2
    ledger: dict[int, int] = {}
    projectors = [AdaptiveRankProjector(30, seed=i, tau=0.95, budget=budget, ledger=ledger) for i in range(3)]
    with caplog.at_level(logging.INFO, logger=adaptive_rank.__name__), pytest.warns(UserWarning, match="exhausted"):
        for projector, grad in zip(projectors, grads):
            projector.refresh(grad)
    ranks = [p.rank for p in projectors]
    assert ranks == [wants[0], wants[1], wants[2] - 2]
    assert sum(ranks) == budget and ledger == {0: ranks[0], 1: ranks[1], 2: ranks[2]}
    assert [f"layer {i}: rank {r}" in caplog.text for i, r in enumerate(ranks)] == [True] * 3
    projectors[0].refresh(grads[0])  # later refreshes keep the rank (the moments are shaped by it)
    assert projectors[0].rank == ranks[0]


def test_rank_survives_resume_in_the_optimizer():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(30, 20, dtype=torch.float64))
    options = dict(rank=12, projector="adaptive-rank", projector_args={"tau": 0.9})
    optimizer = LowRankOptimizer([{"params": [weight], "lowrank": True}], **options)
    weight.grad = gradient(30, 20, 0.7, seed=3)
    optimizer.step()
    rank = optimizer.projectors[weight].rank
    assert rank == numpy_tau_rank(weight.grad, 0.9) < 12
    assert optimizer.state[weight]["exp_avg"].shape == (30, rank)
    resumed = LowRankOptimizer([{"params": [weight], "lowrank": True}], **options)
    resumed.load_state_dict(optimizer.state_dict())
    weight.grad = gradient(30, 20, 0.7, seed=4)
    assert resumed.rank_ledger == {0: rank}
    resumed.step()  # moments of shape (30, rank) still fit
    assert resumed.projectors[weight].rank == rank


def test_options_are_validated():
    with pytest.raises(ValueError, match="tau"):
        AdaptiveRankProjector(4, tau=1.5)
    with pytest.raises(ValueError, match="min_rank"):
        AdaptiveRankProjector(4, min_rank=5)


def test_an_all_zero_first_gradient_keeps_the_maximum_rank():
    projector = AdaptiveRankProjector(6, tau=0.5, budget=10)
    with pytest.warns(UserWarning, match="all zero"):
        projector.refresh(torch.zeros(40, 30, dtype=torch.float64))
    assert projector.rank == 6 and projector.ledger == {0: 6}
    grad = gradient(40, 30, 0.5, seed=0)
    projector.refresh(grad)
    assert projector.project(grad).shape == (40, 6)


def test_each_optimizer_owns_its_budget():
    """Two optimizers in one process: the second's layers get the whole budget again (a
    process-global ledger would hand them what the first left)."""
    grads = [gradient(40, 30, 0.7, seed=s) for s in range(2)]
    budget = numpy_tau_rank(grads[0], 0.95) + 1
    ranks = []
    for _ in range(2):
        weights = [nn.Parameter(torch.zeros(40, 30, dtype=torch.float64)) for _ in grads]
        optimizer = LowRankOptimizer([{"params": weights, "lowrank": True}], rank=30, projector="adaptive-rank",
                                     projector_args={"tau": 0.95, "budget": budget})
        for weight, grad in zip(weights, grads):
            weight.grad = grad.clone()
        with pytest.warns(UserWarning, match="exhausted"):
            optimizer.step()
        ranks.append([optimizer.projectors[w].rank for w in weights])
        assert optimizer.rank_ledger == dict(enumerate(ranks[-1]))
    assert ranks[0] == ranks[1] == [numpy_tau_rank(grads[0], 0.95), 1]
