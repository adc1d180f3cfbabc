"""``decoupled_weight_decay=False``: torch Adam's coupled L2. Low-rank weights project G + λW
(the decay goes through the moments); dense params step exactly as torch.optim.Adam."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_lowrank import LowRankOptimizer


def batches(steps: int):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(7, 6, generator=generator, dtype=torch.float64),
             torch.randn(7, 4, generator=generator, dtype=torch.float64)) for _ in range(steps)]


def train(model, optimizer, data):
    for x, y in data:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def test_full_rank_coupled_l2_equals_torch_adam_in_the_rotated_coordinates():
    """At full rank with a fixed orthonormal basis L (m×m, left side), our step is torch Adam on
    W' = Lᵀ W: its gradient is Lᵀ G, its coupled L2 gradient Lᵀ G + λ W' = Lᵀ (G + λW)."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 4).double()  # 4×6: left side, L is 4×4
    start = layer.weight.detach().clone(), layer.bias.detach().clone()
    data = batches(6)
    optimizer = LowRankOptimizer(
        [{"params": [layer.weight], "lowrank": True, "decoupled_weight_decay": False},
         {"params": [layer.bias], "decoupled_weight_decay": False}], lr=0.05, weight_decay=0.1, rank=4, scale=1.0,
        update_gap=100)
    train(layer, optimizer, data)
    basis, _ = optimizer.projectors[layer.weight].bases()  # fitted at step 0, fixed since

    rotated = nn.Parameter(basis.T @ start[0])
    bias = nn.Parameter(start[1].clone())
    reference = torch.optim.Adam([rotated, bias], lr=0.05, weight_decay=0.1)
    for x, y in data:
        reference.zero_grad()
        nn.functional.mse_loss(x @ (basis @ rotated).T + bias, y).backward()
        reference.step()
    torch.testing.assert_close(layer.weight.detach(), basis @ rotated.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.bias.detach(), bias.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("decoupled", [True, False])
def test_dense_groups_follow_torch_adam_coupling(decoupled):
    torch.manual_seed(0)
    ours, theirs = nn.Linear(6, 4).double(), nn.Linear(6, 4).double()
    theirs.load_state_dict(ours.state_dict())
    data = batches(5)
    train(ours, LowRankOptimizer([{"params": list(ours.parameters()), "decoupled_weight_decay": decoupled}],
                                 lr=0.05, weight_decay=0.1), data)
    train(theirs, torch.optim.Adam(theirs.parameters(), lr=0.05, weight_decay=0.1,
                                   decoupled_weight_decay=decoupled), data)
    for mine, want in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(mine, want, rtol=0, atol=1e-12)
