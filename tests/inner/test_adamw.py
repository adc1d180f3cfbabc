"""The low-rank Adam update: fused kernel and _foreach path against the formula written out."""

from __future__ import annotations

import pytest
import torch

from lit_lowrank.inner.adamw import AdamInner


def plain_adam(lows: list[torch.Tensor], betas, eps) -> list[torch.Tensor]:
    """N_t = M̂_t / (√V̂_t + ε) for a sequence of R_t (GaLore, Alg. 1)."""
    beta1, beta2 = betas
    m = v = torch.zeros_like(lows[0])
    directions = []
    for t, low in enumerate(lows, start=1):
        m = beta1 * m + (1 - beta1) * low
        v = beta2 * v + (1 - beta2) * low * low
        directions.append((m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps))
    return directions


@pytest.mark.parametrize("path", ["_fused", "_foreach"])
def test_directions_follow_the_formula(path):
    torch.manual_seed(0)
    inner = AdamInner(betas=(0.9, 0.95), eps=1e-6)
    lows = [torch.randn(12, 5, dtype=torch.float64) * 1e-3 for _ in range(6)]
    state = inner.init_state(lows[0])
    expected = plain_adam(lows, inner.betas, inner.eps)
    for step, (low, want) in enumerate(zip(lows, expected), start=1):
        (direction,) = getattr(inner, path)([low], [state["exp_avg"]], [state["exp_avg_sq"]], step)
        torch.testing.assert_close(direction, want, rtol=1e-12, atol=0)
