"""SGD inner optimizer: at full rank with an orthonormal basis (rotated on refresh) the low-rank
update is linear in R, so it equals torch.optim.SGD on the full weight; dense params step with
torch SGD's update too; torch's validation of momentum/nesterov."""

from __future__ import annotations

import copy
import pytest
import torch
from torch import nn

from lit_lowrank import LowRankOptimizer
from lit_lowrank.inner.sgd import SGDInner

SGD_CASES = [dict(momentum=0.9), dict(momentum=0.9, nesterov=True), dict(momentum=0.5, dampening=0.3),
             dict(momentum=0.0)]


@pytest.mark.parametrize("options", SGD_CASES)
def test_full_rank_sgd_equals_torch_sgd(options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 5)).double()
    reference = copy.deepcopy(model)
    weights, biases = [model[0].weight, model[2].weight], [model[0].bias, model[2].bias]
    ours = LowRankOptimizer([{"params": weights, "lowrank": True, "decoupled_weight_decay": False},
                             {"params": biases, "decoupled_weight_decay": False}],
                            lr=0.1, weight_decay=0.01, rank=4, scale=1.0, update_gap=3, on_refresh="rotate",
                            inner="sgd", inner_args=options)
    theirs = torch.optim.SGD(reference.parameters(), lr=0.1, weight_decay=0.01, **options)
    generator = torch.Generator().manual_seed(1)
    for _ in range(8):  # refreshes at steps 0, 3, 6
        x, y = torch.randn(7, 6, generator=generator, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
        for net, optimizer in ((model, ours), (reference, theirs)):
            optimizer.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            optimizer.step()
        for mine, want in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(mine, want, rtol=0, atol=1e-12)
    assert ours.refresh_count == 6


def test_first_step_buffer_is_the_gradient_then_momentum():
    inner = SGDInner(momentum=0.9, dampening=0.5)
    low = torch.randn(3, 2)
    state = inner.init_state(low)
    (direction,) = inner.directions([low], [state], 1)
    torch.testing.assert_close(direction, low)  # torch: buf = R on the first step, undamped
    second = torch.randn(3, 2)
    (direction,) = inner.directions([second], [state], 2)
    torch.testing.assert_close(direction, 0.9 * low + 0.5 * second)
    assert inner.linear_state == ("momentum_buffer",) and SGDInner().linear_state == ()


@pytest.mark.parametrize("options", [dict(nesterov=True), dict(momentum=0.9, dampening=0.1, nesterov=True),
                                     dict(momentum=-0.1)])
def test_invalid_options_are_refused_when_the_optimizer_is_built(options):
    with pytest.raises(ValueError, match="momentum"):
        LowRankOptimizer([{"params": [nn.Parameter(torch.randn(4, 3))], "lowrank": True}], inner="sgd",
                         inner_args=options)


def test_reset_on_refresh_zeroes_the_momentum_buffer():
    weight = nn.Parameter(torch.randn(6, 4))
    optimizer = LowRankOptimizer([{"params": [weight], "lowrank": True}], rank=2, update_gap=1, on_refresh="reset",
                                 inner="sgd", inner_args={"momentum": 0.9})
    for _ in range(2):
        weight.grad = torch.randn(6, 4)
        before = weight.detach().clone()
        optimizer.step()
    projector = optimizer.projectors[weight]
    # step 2 refreshed and reset: the buffer holds only (1 − 0)·R₂, so the update is lr·α·lift(R₂)
    low = projector.project(weight.grad)
    torch.testing.assert_close(optimizer.state[weight]["momentum_buffer"], low)
    torch.testing.assert_close(before - weight.detach(), 1e-3 * 0.25 * projector.project_back(low))
