"""Subset-norm Adam (``adamw-sn``, Nguyen et al. 2025) against the formula written out: its
directions, GaLore's trajectory with it across a refresh (``method: galore-sn``), the basis
change it does under ``on_refresh: rotate``, options refused when the optimizer is built, and
``pytorch_optimizer.AdamWSN`` at full rank when that package is installed."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lit_lowrank import LowRankOptimizer, build_optimizer
from lit_lowrank.inner.adamw_sn import SubsetNormAdamInner
from references import svd_basis


def plain_adam_sn(lows, betas, eps, per_row):
    """N_t = √(1−β2ᵗ)/(1−β1ᵗ) · M_t / (√V_t + ε), V the EMA of Σ R² per row (``per_row``) or
    column; β2 = 1: V the running sum, no √(1−β2ᵗ)."""
    beta1, beta2 = betas
    m = torch.zeros_like(lows[0])
    v = torch.zeros_like(lows[0].sum(dim=1 if per_row else 0, keepdim=True))
    directions = []
    for t, low in enumerate(lows, start=1):
        squares = (low * low).sum(dim=1 if per_row else 0, keepdim=True)
        m = beta1 * m + (1 - beta1) * low
        v = v + squares if beta2 == 1 else beta2 * v + (1 - beta2) * squares
        correction = 1.0 if beta2 == 1 else math.sqrt(1 - beta2**t)
        directions.append(correction / (1 - beta1**t) * m / (v.sqrt() + eps))
    return directions


@pytest.mark.parametrize("shape, subsets, per_row", [
    ((12, 3), "auto", True), ((3, 12), "auto", False), ((12, 3), "columns", False), ((3, 12), "rows", True)])
@pytest.mark.parametrize("betas", [(0.9, 0.95), (0.8, 1.0)])
def test_directions_follow_the_formula(shape, subsets, per_row, betas):
    torch.manual_seed(0)
    inner = SubsetNormAdamInner(betas=betas, eps=1e-6, subsets=subsets)
    lows = [torch.randn(*shape, dtype=torch.float64) for _ in range(5)]
    state = inner.init_state(lows[0])
    assert state["subset_exp_avg_sq"].shape == ((shape[0], 1) if per_row else (1, shape[1]))
    assert state["subset_exp_avg_sq"].dtype == torch.float32
    for step, (low, want) in enumerate(zip(lows, plain_adam_sn(lows, betas, 1e-6, per_row)), start=1):
        (direction,) = inner.directions([low], [state], step)
        torch.testing.assert_close(direction, want, rtol=1e-6, atol=0)  # V is float32


def test_low_precision_directions_keep_their_dtype_and_a_float32_norm():
    inner = SubsetNormAdamInner()
    low = torch.randn(10, 4).to(torch.bfloat16)
    state = inner.init_state(low)
    (direction,) = inner.directions([low], [state], 1)
    assert direction.dtype == torch.bfloat16 and torch.isfinite(direction).all()
    assert state["exp_avg"].dtype == torch.bfloat16 and state["subset_exp_avg_sq"].dtype == torch.float32


def reference_galore_sn(weight, grads, *, rank, gap, lr, scale, betas, eps, right):
    """GaLore (Alg. 1) with subset-norm Adam on R: every ``gap`` steps a new top-r SVD basis, the
    moments kept (GaLore's default); V per row of R = G Q (``right``) or per column of R = PᵀG
    (the axis the projection keeps); ``W ← W − η α lift(N)``."""
    beta1, beta2 = betas
    m = v = None
    for t, grad in enumerate(grads, start=1):
        if (t - 1) % gap == 0:
            basis = svd_basis(grad, rank, right)
        low = grad @ basis if right else basis.T @ grad
        squares = (low * low).sum(dim=1 if right else 0, keepdim=True)
        m = (1 - beta1) * low if m is None else beta1 * m + (1 - beta1) * low
        v = (1 - beta2) * squares if v is None else beta2 * v + (1 - beta2) * squares
        direction = math.sqrt(1 - beta2**t) / (1 - beta1**t) * m / (v.sqrt() + eps)
        weight = weight - lr * scale * (direction @ basis.T if right else basis @ direction)
    return weight


@pytest.mark.parametrize("shape", [(12, 7), (7, 12)])
def test_galore_sn_trajectory_equals_the_plain_reference(shape):
    """Nine steps with refreshes at steps 1, 5 and 9; GaLore's ``std`` side projects the shorter
    axis away (right for m ≥ n), and ``auto`` subsets follow the longer one."""
    torch.manual_seed(0)
    grads = [torch.randn(*shape, dtype=torch.float64) for _ in range(9)]
    start = torch.randn(*shape, dtype=torch.float64)
    layer = nn.Linear(shape[1], shape[0], bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(start)
    optimizer = build_optimizer(nn.Sequential(layer), method="galore-sn", targets=["0"], lr=1e-2, rank=3,
                                update_gap=4, scale=0.5, betas=(0.8, 0.95), weight_decay=0.0)
    for grad in grads:
        layer.weight.grad = grad
        optimizer.step()
    expected = reference_galore_sn(start, grads, rank=3, gap=4, lr=1e-2, scale=0.5, betas=(0.8, 0.95), eps=1e-6,
                                   right=shape[0] >= shape[1])
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=1e-5, atol=1e-9)  # V is float32


@pytest.mark.parametrize("shape, side", [((8, 3), "right"), ((3, 8), "left")])
@pytest.mark.parametrize("subsets", ["auto", "rows", "columns"])
def test_rotating_by_a_permutation_equals_training_in_the_permuted_basis(shape, side, subsets):
    """A permuted basis permutes R's projected axis: M and V over that axis are permuted, V over
    the kept axis is unchanged — exactly the state of a run on the permuted R from the start."""
    torch.manual_seed(1)
    inner = SubsetNormAdamInner(betas=(0.8, 0.9), subsets=subsets)
    perm = torch.eye(3, dtype=torch.float64)[[2, 0, 1]]
    maps = (None, perm) if side == "right" else (perm, None)
    permuted = (lambda low: low @ perm.T) if side == "right" else (lambda low: perm @ low)
    lows = [torch.randn(*shape, dtype=torch.float64) for _ in range(3)]
    state, twin = inner.init_state(lows[0]), inner.init_state(lows[0])
    for step, low in enumerate(lows, start=1):
        inner.directions([low], [state], step)
        inner.directions([permuted(low)], [twin], step)
    inner.rotate(state, *maps)
    torch.testing.assert_close(state["exp_avg"], twin["exp_avg"])
    torch.testing.assert_close(state["subset_exp_avg_sq"], twin["subset_exp_avg_sq"])


@pytest.mark.parametrize("options, match", [
    ({"inner_args": {"subsets": "blocks"}}, "subsets must be one of auto, rows, columns"),
    ({"inner_args": {"eps": -1e-8}}, "eps must be finite and > 0"),
    ({"inner_args": {"betas": (0.9, 1.5)}}, r"subset-norm β2 must be in \[0, 1\]"),
    ({"inner_args": {"betas": (1.0, 0.999)}}, r"β1 must be in \[0, 1\)"),
])
def test_bad_options_are_refused_when_built(options, match):
    weight = nn.Parameter(torch.randn(6, 4))
    with pytest.raises(ValueError, match=match):
        LowRankOptimizer([{"params": [weight], "lowrank": True}], rank=2, inner="adamw-sn", **options)


def test_full_rank_equals_pytorch_optimizer_adamwsn():
    """At rank min(m, n) the orthonormal basis preserves G's row norms, so per-row subsets of R
    are AdamWSN's ``subset_size = n`` subsets of G, and the lifted step is AdamWSN's."""
    peer = pytest.importorskip("pytorch_optimizer", reason="pytorch-optimizer is only a test reference")
    torch.manual_seed(2)
    m, n = 12, 7
    grads = [torch.randn(m, n, dtype=torch.float64) for _ in range(6)]
    ours = nn.Parameter(torch.randn(m, n, dtype=torch.float64))
    theirs = nn.Parameter(ours.detach().clone())
    settings = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    optimizer = LowRankOptimizer([{"params": [ours], "lowrank": True}], rank=n, update_gap=100, scale=1.0,
                                 inner="adamw-sn", **settings)
    reference = peer.AdamWSN([{"params": [theirs], "sn": True}], subset_size=n, foreach=False, **settings)
    for grad in grads:
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        optimizer.step()
        reference.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-9)  # our V is float32
