"""A projector whose rank r′ changes from one refresh to the next (an adaptive-rank plugin): the
weight's moments restart in the new shape, whatever ``on_refresh`` says, and the step is the one
a fresh moment state gives — never moments of the old shape read by the fused kernel."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from lit_lowrank import LowRankOptimizer, hookimpl
from lit_lowrank.projectors.base import DenseBasisProjector, Side
from lit_lowrank.projectors.svd import top_singular_bases

RANKS = (4, 2, 6)
BETAS, EPS, LR, SCALE = (0.9, 0.999), 1e-8, 1e-2, 0.25


class CyclingRankProjector(DenseBasisProjector):
    """Exact SVD whose rank cycles through :data:`RANKS`, one per refresh (each ≤ ``rank``)."""

    def fit(self, grad: Tensor, side: Side) -> tuple[Tensor | None, Tensor | None]:
        u, _, vh = torch.linalg.svd(grad, full_matrices=False)
        return top_singular_bases(u, vh, RANKS[self.refreshes % len(RANKS)], side)


class CyclingRankPlugin:
    @hookimpl
    def register_projectors(self, register):
        register("cycling-rank", CyclingRankProjector)


def fresh_moment_step(weight: Tensor, grad: Tensor, right: Tensor, step: int) -> Tensor:
    """GaLore-Adam's update from zero moments at (1-based) step ``step``, written out: R = G Q,
    M = (1−β1) R, V = (1−β2) R², N = (M / (1−β1ᵗ)) / (√(V / (1−β2ᵗ)) + ε), W − η α N Qᵀ."""
    beta1, beta2 = BETAS
    low = grad.double() @ right.double()
    first, second = (1 - beta1) * low, (1 - beta2) * low.square()
    direction = (first / (1 - beta1 ** step)) / ((second / (1 - beta2 ** step)).sqrt() + EPS)
    return weight.double() - LR * SCALE * direction @ right.double().T


@pytest.mark.parametrize("on_refresh", ["keep", "reset", "rotate"])
def test_a_changed_rank_resets_the_moments_to_the_new_shape(fresh_plugins, on_refresh):
    fresh_plugins.register_plugin(CyclingRankPlugin(), name="cycling-rank-test")
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(12, 10))  # std side: the right basis Q (10×r′), R = G Q (12×r′)
    optimizer = LowRankOptimizer([{"params": [weight], "lowrank": True}], lr=LR, betas=BETAS, eps=EPS, rank=6,
                                 projector="cycling-rank", update_gap=2, scale=SCALE, on_refresh=on_refresh)
    checked = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(9):  # refreshes at 0, 2, 4, 6, 8: ranks 4, 2, 6, 4, 2
            grad = torch.randn(12, 10)
            before = weight.detach().clone()
            weight.grad = grad
            optimizer.step()
            state, (left, right) = optimizer.state[weight], optimizer.projectors[weight].bases()
            rank = RANKS[(t // 2) % len(RANKS)]
            assert left is None and right.shape == (10, rank)
            assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (12, rank)
            if t % 2 == 0 and t > 0:  # a refresh to another rank: the step of fresh moments, count going on
                torch.testing.assert_close(weight.detach().double(), fresh_moment_step(before, grad, right, t + 1),
                                           rtol=1e-6, atol=1e-7)
                checked.append(t)
    assert checked == [2, 4, 6, 8]
    reshaped = [w for w in caught if "changed the bases" in str(w.message)]
    if on_refresh == "reset":
        assert not reshaped  # asked for, so nothing to tell
    else:
        assert len(reshaped) == 1  # once per weight
        assert "parameter 0" in str(reshaped[0].message) and "(10, 4)" in str(reshaped[0].message)
