"""The ``momentum`` inner optimizer: EMA momentum of R with Adam's first-moment correction,
against the closed form on the full weight."""

from __future__ import annotations

import torch
from torch import nn

from lit_lowrank import LowRankOptimizer


def test_momentum_inner_alone_is_bias_corrected_heavy_ball():
    """With GaLore's rule: ``W ← W − η α lift(M) / (1 − β1ᵗ)``; at full rank and α = 1 that is
    momentum SGD with Adam's first-moment correction on the full weight."""
    torch.manual_seed(3)
    grads = [torch.randn(5, 5, dtype=torch.float64) for _ in range(4)]
    weight = nn.Parameter(torch.randn(5, 5, dtype=torch.float64))
    expected = weight.detach().clone()
    optimizer = LowRankOptimizer([{"params": [weight], "lowrank": True}], lr=0.1, rank=5, scale=1.0,
                                 inner="momentum", betas=(0.7, 0.999))
    momentum = torch.zeros(5, 5, dtype=torch.float64)
    for t, grad in enumerate(grads, start=1):
        weight.grad = grad
        optimizer.step()
        momentum = 0.7 * momentum + 0.3 * grad
        expected -= 0.1 * momentum / (1 - 0.7**t)
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-12, atol=1e-12)
