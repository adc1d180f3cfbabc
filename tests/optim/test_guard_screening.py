"""The non-finite guard screens a low-rank weight's projection ``R`` instead of its gradient ``G``
on steps that do not refresh its basis (``R`` is what the step computes anyway, r/min(m, n) of
``G``'s size), and still finds every NaN and inf of ``G``; ``G`` itself on refresh steps and for
dense weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_lowrank import build_optimizer
from lit_lowrank.optim import lowrank

M, N, RANK = 12, 6, 2  # m ≥ n: a right projection R = G Q (m×r)


def model_and_optimizer(**options) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(N, M), nn.Linear(M, 1))
    optimizer = build_optimizer(model, targets=["0"], rank=RANK, update_gap=10, lr=1e-2, **options)
    return model, optimizer


def step_with(model: nn.Module, optimizer, weight_grad: torch.Tensor) -> None:
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    model[0].weight.grad = weight_grad
    optimizer.step()


def first_gradient() -> torch.Tensor:
    """A gradient whose last column is zero: Q's last row is zero too, so an inf there meets
    only zeros of Q (inf · 0 = NaN)."""
    grad = torch.randn(M, N, generator=torch.Generator().manual_seed(1))
    grad[:, -1] = 0
    return grad


def test_a_step_without_refresh_screens_r_and_a_refresh_step_screens_g(monkeypatch):
    model, optimizer = model_and_optimizer()
    screened = []
    original = lowrank.first_nonfinite

    def recording(tensors, sources=None):
        screened.append([tuple(t.shape) for t in tensors])
        return original(tensors, sources)

    monkeypatch.setattr(lowrank, "first_nonfinite", recording)
    step_with(model, optimizer, first_gradient())  # refreshes: G is screened
    step_with(model, optimizer, torch.randn(M, N))
    weight_shapes = [shapes[0] for shapes in screened]  # the target weight comes first
    assert weight_shapes == [(M, N), (M, RANK)]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("column", [0, N - 1])  # N - 1: where Q's row is zero
def test_every_nonfinite_entry_of_g_is_found_through_r(value, column):
    model, optimizer = model_and_optimizer()
    step_with(model, optimizer, first_gradient())
    before = [p.detach().clone() for p in model.parameters()]
    assert torch.count_nonzero(optimizer.projectors[model[0].weight].bases()[1][-1]) == 0
    grad = torch.randn(M, N)
    grad[3, column] = value
    with pytest.warns(RuntimeWarning, match="non-finite gradient in 0.weight"):
        step_with(model, optimizer, grad)
    assert optimizer.skipped_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_a_finite_gradient_whose_projection_overflows_is_not_skipped():
    model, optimizer = model_and_optimizer()
    step_with(model, optimizer, first_gradient())
    grad = torch.full((M, N), 3e38)  # finite; G Q sums past float32's range
    basis = optimizer.projectors[model[0].weight].bases()[1]
    assert not torch.isfinite(grad @ basis).all()
    step_with(model, optimizer, grad)
    assert optimizer.skipped_steps == 0
