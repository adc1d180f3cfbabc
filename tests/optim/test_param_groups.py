"""``LowRankOptimizer.add_param_group``: validated and indexed like the constructor's groups; a
group without ``lowrank`` is split into projected targets and dense rest, keeping the hypers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_lowrank import LowRankOptimizer, build_optimizer


def _build(model, **options):
    """build_optimizer on these block-less toy models, projecting their `attn` and `mlp` layers."""
    return build_optimizer(model, **{"targets": ["attn", "mlp"], **options})


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(8, 12)
        self.mlp = nn.Linear(12, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.mlp(torch.tanh(self.attn(x))))


def _step(model, optimizer):
    optimizer.zero_grad()
    model(torch.randn(4, 8, generator=torch.Generator().manual_seed(0))).square().sum().backward()
    optimizer.step()


def test_lowrank_group_with_a_vector_is_refused_without_printing_it():
    optimizer = LowRankOptimizer([nn.Parameter(torch.zeros(3, 3))])
    with pytest.raises(ValueError, match=r"takes 2-D \(m×n\) weights, got shape \(5,\)") as error:
        optimizer.add_param_group({"params": [nn.Parameter(torch.full((5,), 7.0))], "lowrank": True})
    assert "tensor(" not in str(error.value)
    assert len(optimizer.param_groups) == 1


def test_added_lowrank_group_is_indexed_and_stepped():
    first, added = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(10, 6))
    optimizer = LowRankOptimizer([{"params": [first], "lowrank": True}], rank=2)
    optimizer.add_param_group({"params": [added], "lowrank": True})
    first.grad, added.grad = torch.randn(6, 4), torch.randn(10, 6)
    optimizer.step()
    assert optimizer.state[added]["exp_avg"].shape == (10, 2)  # std: 10×6 projected on the right (G Q), rank 2
    assert all("subspace" in optimizer.state_dict()["state"][index] for index in (0, 1))


def test_unfrozen_layer_is_split_into_projected_and_dense_with_the_hypers():
    model = Blocks()
    model.mlp.requires_grad_(False)
    optimizer = _build(model, rank=3, betas=(0.8, 0.95), weight_decay=0.05, lr=1e-2)
    assert all(p is not model.mlp.weight for group in optimizer.param_groups for p in group["params"])
    model.mlp.requires_grad_(True)
    optimizer.add_param_group({"params": list(model.mlp.parameters()), "lr": 1e-3})
    projected, dense = optimizer.param_groups[-2:]
    assert projected["lowrank"] and projected["params"] == [model.mlp.weight]
    assert not dense["lowrank"] and dense["params"] == [model.mlp.bias]
    for group in (projected, dense):
        assert group["betas"] == (0.8, 0.95) and group["weight_decay"] == 0.05 and group["lr"] == 1e-3
    _step(model, optimizer)
    assert model.mlp.weight in optimizer.projectors
    assert optimizer.state[model.mlp.weight]["exp_avg"].shape == (3, 12)  # std: 8×12 projected on the left (Lᵀ G)


def test_betas_changed_mid_run_are_used_from_the_next_step():
    """Editing a group's ``betas`` between steps rebuilds its inner optimizer: the run equals one
    whose inner optimizer had the new betas from that step on (a plain Adam reference)."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(12, 8))
    grads = [torch.randn(12, 8) for _ in range(4)]
    optimizer = LowRankOptimizer([{"params": [weight], "lowrank": True}], lr=0.1, rank=8, side="full",
                                 on_refresh="rotate", update_gap=100)
    exp_avg, exp_avg_sq, reference = torch.zeros(8, 8), torch.zeros(8, 8), weight.detach().clone()
    for step, grad in enumerate(grads, start=1):
        betas = (0.9, 0.999) if step <= 2 else (0.5, 0.9)
        optimizer.param_groups[0]["betas"] = betas
        weight.grad = grad
        optimizer.step()
        left, right = (basis for basis in optimizer.projectors[weight].bases())
        low = left.T @ grad @ right
        exp_avg.lerp_(low, 1 - betas[0])
        exp_avg_sq.mul_(betas[1]).addcmul_(low, low, value=1 - betas[1])
        # Adam with a changing beta: each step's bias correction uses that step's betas
        direction = (exp_avg / (1 - betas[0] ** step)) / ((exp_avg_sq / (1 - betas[1] ** step)).sqrt() + 1e-8)
        reference -= 0.1 * 0.25 * left @ direction @ right.T
        torch.testing.assert_close(weight.detach(), reference, rtol=1e-5, atol=1e-6)


def test_scale_changed_mid_run_scales_the_next_update():
    """GaLore's step is −η·α·P N: doubling ``group["scale"]`` between steps doubles the next update
    (the moments, and so N, do not depend on α), also after a ``load_state_dict``."""
    torch.manual_seed(0)
    grads = [torch.randn(12, 8) for _ in range(3)]
    deltas = []
    for scales in ((0.25, 0.25, 0.25), (0.25, 0.25, 0.5)):
        weight = nn.Parameter(torch.ones(12, 8))
        optimizer = LowRankOptimizer([{"params": [weight], "lowrank": True}], lr=0.1, rank=4)
        for grad, scale in zip(grads, scales):
            optimizer.load_state_dict(optimizer.state_dict())  # replaced groups: rebuilt, not stale
            optimizer.param_groups[0]["scale"] = scale
            before = weight.detach().clone()
            weight.grad = grad
            optimizer.step()
        deltas.append(weight.detach() - before)
    torch.testing.assert_close(deltas[1], 2 * deltas[0])
