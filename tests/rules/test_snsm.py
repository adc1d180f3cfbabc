"""SNSM (Nguyen et al. 2025): the ``snsm`` rule with the ``momentum`` inner optimizer against a
plain AdamSNSM written here, step by step across refreshes; the subset choice; composition with
another projector; options refused when the optimizer is built."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lit_lowrank import LowRankOptimizer, build_optimizer
from references import svd_basis


def reference_snsm(weight, grads, *, rank, gap, lr, betas, eps, right, rows):
    """AdamSNSM for one weight: every ``gap`` steps a new top-r SVD basis and a fresh momentum;
    ``M ← β1 M + (1−β1) R``; ``V ← β2 V + (1−β2) Σ G²`` per row (``rows``) or column;
    ``W ← W − η √(1−β2ᵗ)/(1−β1ᵗ) · (lift(M) + G − lift(R)) / (√V + ε)``; β2 = 1: ``V ← V + Σ G²``
    and no ``√(1−β2ᵗ)`` (AdaGrad's norm)."""
    beta1, beta2 = betas
    momentum, norm = None, torch.zeros(weight.shape[0], 1) if rows else torch.zeros(1, weight.shape[1])
    for t, grad in enumerate(grads, start=1):
        if (t - 1) % gap == 0:
            basis = svd_basis(grad, rank, right)
            momentum = None
        low = grad @ basis if right else basis.T @ grad
        lift = low @ basis.T if right else basis @ low
        momentum = (1 - beta1) * low if momentum is None else beta1 * momentum + (1 - beta1) * low
        lifted = momentum @ basis.T if right else basis @ momentum
        squares = (grad * grad).sum(dim=1 if rows else 0, keepdim=True)
        norm = norm + squares if beta2 == 1 else beta2 * norm + (1 - beta2) * squares
        step = lr * (1.0 if beta2 == 1 else math.sqrt(1 - beta2**t)) / (1 - beta1**t)
        weight = weight - step * (lifted + grad - lift) / (norm.sqrt() + eps)
    return weight


@pytest.mark.parametrize("shape", [(12, 7), (7, 12)])
def test_trajectory_equals_plain_adam_snsm(shape):
    """GaLore's ``std`` side projects the longer axis away (right for m ≥ n); ``auto`` subsets
    are the longer axis's rows (m ≥ n) or columns."""
    torch.manual_seed(0)
    grads = [torch.randn(*shape, dtype=torch.float64) for _ in range(9)]
    start = torch.randn(*shape, dtype=torch.float64)
    layer = nn.Linear(shape[1], shape[0], bias=False).double()
    weight = layer.weight
    with torch.no_grad():
        weight.copy_(start)
    optimizer = build_optimizer(nn.Sequential(layer), method="snsm", targets=["0"], lr=1e-2, rank=3,
                                update_gap=4, betas=(0.8, 0.95), weight_decay=0.0)
    for grad in grads:
        weight.grad = grad
        optimizer.step()
    m, n = shape
    expected = reference_snsm(start, grads, rank=3, gap=4, lr=1e-2, betas=(0.8, 0.95), eps=1e-6,
                              right=m >= n, rows=m >= n)
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-6, atol=1e-9)  # V is float32


def trained(start, grads, **options):
    """A weight starting at ``start`` stepped with ``grads`` by SNSM's components at lr 0.01."""
    weight = nn.Parameter(start.clone())
    optimizer = LowRankOptimizer([{"params": [weight], "lowrank": True}], lr=1e-2, rule="snsm", inner="momentum",
                                 scale=1.0, on_refresh="reset", **options)
    for grad in grads:
        weight.grad = grad
        optimizer.step()
    return weight, optimizer


@pytest.mark.parametrize("subsets, rows", [("rows", True), ("columns", False)])
def test_explicit_subsets_and_their_state(subsets, rows):
    torch.manual_seed(1)
    grads = [torch.randn(10, 6, dtype=torch.float64) for _ in range(3)]
    start = torch.randn(10, 6, dtype=torch.float64)
    weight, optimizer = trained(start, grads, rank=2, update_gap=5, rule_args={"subsets": subsets})
    expected = reference_snsm(start, grads, rank=2, gap=5, lr=1e-2, betas=(0.9, 0.999), eps=1e-6, right=True,
                              rows=rows)
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-6, atol=1e-9)  # V is float32
    norm = optimizer.state[weight]["subset_norm"]
    assert norm.shape == ((10, 1) if rows else (1, 6)) and norm.dtype == torch.float32


def test_beta2_one_accumulates_like_adagrad():
    """``rule_args: {betas: [β1, 1]}`` (the group's betas stay below 1): V sums the subset squares."""
    torch.manual_seed(4)
    grads = [torch.randn(9, 5, dtype=torch.float64) for _ in range(6)]
    start = torch.randn(9, 5, dtype=torch.float64)
    weight, _ = trained(start, grads, rank=2, update_gap=4, betas=(0.8, 0.95), rule_args={"betas": (0.8, 1.0)})
    expected = reference_snsm(start, grads, rank=2, gap=4, lr=1e-2, betas=(0.8, 1.0), eps=1e-6, right=True,
                              rows=True)
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-6, atol=1e-9)  # V is float32


def test_composes_with_another_projector():
    """Subset norms and subspace momentum over a randomized-SVD basis: the step is the same
    formula with the rsvd basis (read back from the projector)."""
    torch.manual_seed(2)
    grad = torch.randn(16, 9, dtype=torch.float64)
    weight = nn.Parameter(torch.randn(16, 9, dtype=torch.float64))
    start = weight.detach().clone()
    optimizer = LowRankOptimizer([{"params": [weight], "lowrank": True}], lr=1e-2, rank=3, rule="snsm",
                                 inner="momentum", projector="rsvd", scale=1.0)
    weight.grad = grad
    optimizer.step()
    _, basis = optimizer.projectors[weight].bases()
    low = grad @ basis
    update = (0.1 * low) @ basis.T + grad - low @ basis.T  # M = (1 − β1) R on the first step
    norm = 0.001 * (grad * grad).sum(dim=1, keepdim=True)
    expected = start - 1e-2 * math.sqrt(0.001) / 0.1 * update / (norm.sqrt() + 1e-6)
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-6, atol=1e-9)  # V is float32


@pytest.mark.parametrize("options, match", [
    ({"rule_args": {"subsets": "diagonal"}}, "subsets must be one of auto, rows, columns"),
    ({"rule_args": {"eps": 0.0}}, "eps must be finite and > 0"),
])
def test_bad_options_are_refused_when_built(options, match):
    weight = nn.Parameter(torch.randn(6, 4))
    with pytest.raises(ValueError, match=match):
        LowRankOptimizer([{"params": [weight], "lowrank": True}], rank=2, rule="snsm", inner="momentum", **options)


def test_a_checkpoint_with_other_subsets_is_refused_naming_the_fix():
    torch.manual_seed(5)
    _, saved = trained(torch.randn(10, 6), [torch.randn(10, 6)], rank=2, rule_args={"subsets": "rows"})
    weight, _ = trained(torch.randn(10, 6), [], rank=2)
    resumed = LowRankOptimizer([{"params": [weight], "lowrank": True}], lr=1e-2, rank=2, rule="snsm",
                               inner="momentum", scale=1.0, on_refresh="reset", rule_args={"subsets": "columns"})
    with pytest.warns(UserWarning, match="other than the checkpoint's"):
        resumed.load_state_dict(saved.state_dict())
    weight.grad = torch.randn(10, 6)
    with pytest.raises(ValueError, match="resume with the checkpoint's rule_args subsets"):
        resumed.step()
