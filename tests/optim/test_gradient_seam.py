"""The gradient seam: a projected gradient ``R`` reaches the optimizer through
``LowRankOptimizer.receive`` — from the DDP communication hook, layer-wise updates and CompAct's
layers alike — and a step on it equals the step on the full gradient it projects."""

from __future__ import annotations

import torch
from torch import nn

from lit_lowrank import LowRankOptimizer
from lit_lowrank.optim.layerwise import LayerwiseUpdates
from lit_lowrank.transforms.compact import bind_compact, compact_linear_layers

SHAPES = ((12, 8), (6, 10))


def _weights_and_optimizer() -> tuple[list[nn.Parameter], LowRankOptimizer]:
    """Two low-rank weights (rank 3, a refresh at the first step only), after that first step."""
    torch.manual_seed(0)
    weights = [nn.Parameter(torch.randn(shape)) for shape in SHAPES]
    optimizer = LowRankOptimizer([{"params": weights, "lowrank": True}], lr=1e-2, rank=3, update_gap=100)
    for p in weights:
        p.grad = torch.randn(p.shape)
    optimizer.step()
    optimizer.zero_grad()
    return weights, optimizer


def _gradients(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in SHAPES]


def test_a_step_on_received_projections_equals_the_step_on_their_gradients():
    """``receive(p, R)`` (accumulated over two micro-batches) and no ``.grad``: the step equals
    one on ``p.grad = G₁ + G₂`` (the projection is linear)."""
    first, second = _gradients(1), _gradients(2)
    reference, by_grad = _weights_and_optimizer()
    for p, g1, g2 in zip(reference, first, second):
        p.grad = g1 + g2
    by_grad.step()
    weights, optimizer = _weights_and_optimizer()
    for p, g1, g2 in zip(weights, first, second):
        optimizer.receive(p, optimizer.project(p, g1))
        optimizer.receive(p, optimizer.project(p, g2), accumulate=True)
    assert optimizer.received == frozenset(weights)
    optimizer.step()
    assert not optimizer.received
    for mine, want in zip(weights, reference):
        torch.testing.assert_close(mine, want)


def test_step_group_steps_a_weight_on_its_received_projection():
    """Layer-wise mode: ``step_group`` of one weight uses the ``R`` it received (and uses it up),
    as ``step()`` uses ``p.grad``; the other weight's ``R`` waits."""
    gradients = _gradients(3)
    reference, by_grad = _weights_and_optimizer()
    reference[0].grad = gradients[0]
    by_grad.step()
    weights, optimizer = _weights_and_optimizer()
    for p, grad in zip(weights, gradients):
        optimizer.receive(p, optimizer.project(p, grad))
    optimizer.step_group(optimizer.param_groups[0], [weights[0]])
    assert optimizer.received == frozenset({weights[1]})
    torch.testing.assert_close(weights[0], reference[0])
    torch.testing.assert_close(weights[1], reference[1])  # not stepped yet


def _recording_receive(monkeypatch) -> list[torch.Tensor]:
    """Record each parameter ``LowRankOptimizer.receive`` is given."""
    calls, original = [], LowRankOptimizer.receive

    def receive(self, p, low, **options):
        calls.append(p)
        return original(self, p, low, **options)

    monkeypatch.setattr(LowRankOptimizer, "receive", receive)
    return calls


def test_layerwise_accumulation_delivers_through_the_seam(monkeypatch):
    weights, optimizer = _weights_and_optimizer()
    calls = _recording_receive(monkeypatch)
    updates = LayerwiseUpdates(optimizer, accumulation=2).attach()
    x = [torch.randn(4, 8), torch.randn(4, 10)]
    for _ in range(2):  # two micro-batches: R accumulated, then delivered for the step
        sum((xi @ w.T).square().sum() for xi, w in zip(x, weights)).backward()
    updates.detach()
    assert [id(p) for p in calls] == [id(weights[1]), id(weights[0])]  # in backward's order


def test_compact_layers_deliver_through_the_seam(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.ModuleList([nn.Linear(8, 6)]))
    compact_linear_layers(model, targets=[r"0\.0"])
    weight = model[0][0].weight
    optimizer = LowRankOptimizer([{"params": [weight], "lowrank": True}], rank=3, projector="random", side="right")
    bind_compact(model, optimizer)
    calls = _recording_receive(monkeypatch)
    model[0][0](torch.randn(5, 8)).sum().backward()
    assert [id(p) for p in calls] == [id(weight)] and weight.grad is None
