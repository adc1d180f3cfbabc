"""Warm-started subspace tracking (``svd-warm``): the first refresh is the exact SVD, later ones
subspace iteration from the previous basis, which converges to the top-r singular subspace at the
rate the spectral gap sets; bases ordered by singular value, signs kept, state resumed bitwise."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from lit_lowrank import LowRankOptimizer, build_optimizer
from lit_lowrank.projectors.base import Side
from lit_lowrank.projectors.svd import SVDProjector
from lit_lowrank.projectors.svd_warm import WarmSVDProjector

SIDES = ("std", "reverse_std", "left", "right", "full")


def orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))[0]


def known_spectrum(m: int, n: int, singular: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``(G, U, V)`` with ``G = U diag(singular) Vᵀ`` for random orthonormal U (m×k), V (n×k):
    the top-r singular vectors are U's and V's first r columns by construction."""
    generator = torch.Generator().manual_seed(seed)
    u, v = orthonormal(m, len(singular), generator), orthonormal(n, len(singular), generator)
    return u @ torch.diag(singular) @ v.T, u, v


def gapped(rank: int, count: int, ratio: float) -> torch.Tensor:
    """Singular values 10, 9.9, … for the top ``rank``, then ``ratio`` times less and decaying."""
    top = 10 - 0.1 * torch.arange(rank, dtype=torch.float64)
    return torch.cat([top, top[-1] * ratio * 0.99 ** torch.arange(count - rank, dtype=torch.float64)])


def tangent_of_largest_angle(basis: torch.Tensor, exact: torch.Tensor) -> float:
    """tan of the largest principal angle between span(basis) and span(exact), both orthonormal."""
    cosine = torch.linalg.svdvals(exact.T @ basis).min().clamp(max=1.0).item()
    return math.sqrt(max(1 - cosine**2, 0.0)) / cosine


@pytest.mark.parametrize("shape", [(60, 40), (40, 60)])
@pytest.mark.parametrize("side", ["std", "reverse_std", "full"])
@pytest.mark.parametrize("iterations", [1, 2])
def test_one_refresh_contracts_the_angle_at_the_rate_of_the_spectral_gap(shape, side, iterations):
    """Orthogonal iteration on A Aᵀ: tan θ_new ≤ (σ_{r+1}/σ_r)^(2q) · tan θ_start for the largest
    principal angle θ to the exact top-r subspace (the classical bound), from an unrelated start."""
    rank, ratio = 5, 0.5
    grad, u, v = known_spectrum(*shape, gapped(rank, min(shape), ratio))
    projector = WarmSVDProjector(rank, side=side, iterations=iterations)
    start, _, _ = known_spectrum(*shape, gapped(rank, min(shape), ratio), seed=1)  # an unrelated subspace
    projector.refresh(start)
    tracked = 1 if projector.side is Side.RIGHT else 0  # the iterated basis: Q on the right, else L
    exact = (u, v)[tracked][:, :rank]
    before = tangent_of_largest_angle(projector.bases()[tracked], exact)
    projector.refresh(grad)
    after = tangent_of_largest_angle(projector.bases()[tracked], exact)
    sigma = gapped(rank, min(shape), ratio)
    assert after <= (sigma[rank] / sigma[rank - 1]).item() ** (2 * iterations) * before * 1.001
    assert after < before


@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_repeated_refreshes_converge_to_the_top_singular_vectors_in_order(side):
    rank = 4
    singular = torch.tensor([8.0, 6.0, 4.0, 3.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5], dtype=torch.float64)
    grad, u, v = known_spectrum(30, 10, singular)
    projector = WarmSVDProjector(rank, side=side)
    projector.refresh(known_spectrum(30, 10, singular, seed=1)[0])
    for _ in range(12):
        projector.refresh(grad)
    left, right = projector.bases()
    for basis, exact in ((left, u[:, :rank]), (right, v[:, :rank])):
        if basis is not None:  # each column the singular vector of its rank, up to sign
            torch.testing.assert_close((basis * exact).sum(0).abs(), torch.ones(rank, dtype=torch.float64))
            torch.testing.assert_close(basis.T @ basis, torch.eye(rank, dtype=torch.float64))
    if side == "full":  # the Ritz pairs: Lᵀ G Q = diag(σ), signs matched pairwise
        torch.testing.assert_close(left.T @ grad @ right, torch.diag(singular[:rank]))


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("shape", [(20, 13), (13, 20)])
def test_the_first_refresh_is_the_exact_svd(side, shape):
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    warm, exact = WarmSVDProjector(4, side=side), SVDProjector(4, side=side)
    warm.refresh(grad)
    exact.refresh(grad)
    for mine, theirs in zip(warm.bases(), exact.bases()):
        assert (mine is None and theirs is None) or torch.equal(mine, theirs)


def test_a_stack_is_tracked_slice_by_slice():
    generator = torch.Generator().manual_seed(0)
    stacks = [torch.randn(3, 16, 9, generator=generator, dtype=torch.float64) for _ in range(3)]
    stacked = WarmSVDProjector(4, side="full")
    alone = [WarmSVDProjector(4, side="full") for _ in range(3)]
    for stack in stacks:
        stacked.refresh(stack)
        for index, projector in enumerate(alone):
            projector.refresh(stack[index])
    for index, projector in enumerate(alone):
        for mine, theirs in zip(stacked.bases(), projector.bases()):
            torch.testing.assert_close(mine[index], theirs)


def test_signs_follow_the_previous_basis():
    """Stored bases with some columns negated (as valid a basis as any): the next refresh keeps
    those signs, LAPACK's own choice notwithstanding, both after no drift and after a small one."""
    singular = torch.tensor([10.0, 8.0, 6.0, 4.0, 1.0, 0.5, 0.25, 0.1], dtype=torch.float64)
    grad, _, _ = known_spectrum(30, 8, singular)
    noise = torch.randn(30, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    flips = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    for drift in (0.0, 0.02):
        projector = WarmSVDProjector(4, side="full")
        projector.refresh(grad)
        state = projector.state_dict()
        state["left"], state["right"] = state["left"] * flips, state["right"] * flips
        projector.load_state_dict(state)
        stored = projector.bases()
        projector.refresh(grad + drift * noise)
        for old, new in zip(stored, projector.bases()):
            torch.testing.assert_close((old * new).sum(0), torch.ones(4, dtype=torch.float64), atol=1e-3, rtol=0)


def test_a_resumed_projector_tracks_bitwise_as_the_uninterrupted_one():
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(24, 17, generator=generator) for _ in range(4)]
    straight = WarmSVDProjector(5, side="full", iterations=2)
    for grad in grads[:2]:
        straight.refresh(grad)
    buffer = io.BytesIO()
    torch.save(straight.state_dict(), buffer)
    buffer.seek(0)
    resumed = WarmSVDProjector(5, side="full", iterations=2)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for grad in grads[2:]:
        straight.refresh(grad)
        resumed.refresh(grad)
    for mine, theirs in zip(straight.bases(), resumed.bases()):
        assert torch.equal(mine, theirs)


def test_a_stored_basis_of_another_rank_is_not_a_start():
    """A checkpoint of rank 3 loaded at rank 5: that refresh is cold, the exact SVD's basis."""
    generator = torch.Generator().manual_seed(0)
    old = WarmSVDProjector(3)
    old.refresh(torch.randn(20, 12, generator=generator))
    grad = torch.randn(20, 12, generator=generator)
    wider, exact = WarmSVDProjector(5), SVDProjector(5)
    wider.load_state_dict(old.state_dict())
    wider.refresh(grad)
    exact.refresh(grad)
    assert torch.equal(wider.bases()[1], exact.bases()[1])


def test_no_iteration_is_refused_naming_the_exact_projector():
    with pytest.raises(ValueError, match="iterations must be >= 1.*projector 'svd'"):
        WarmSVDProjector(4, iterations=0)


def test_galore_warm_trains_with_the_tracked_basis():
    """The method's optimizer refreshes with svd-warm: its bases are those of a projector fed the
    same gradients, and not the exact SVD's after the first refresh."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8))
    optimizer = build_optimizer(model, method="galore-warm", targets=["0"], exclude=[], rank=4, update_gap=1)
    assert isinstance(optimizer, LowRankOptimizer)
    reference = WarmSVDProjector(4)
    weight = model[0].weight
    for step in range(3):
        generator = torch.Generator().manual_seed(step)
        model(torch.randn(32, 16, generator=generator)).square().mean().backward()
        reference.refresh(weight.grad.clone())
        gradient = weight.grad.clone()
        optimizer.step()
        optimizer.zero_grad()
    tracked = optimizer.projectors[weight]
    assert isinstance(tracked, WarmSVDProjector)
    assert torch.equal(tracked.bases()[1], reference.bases()[1])
    exact = SVDProjector(4)
    exact.refresh(gradient)
    assert not torch.allclose(tracked.bases()[1].abs(), exact.bases()[1].abs())
