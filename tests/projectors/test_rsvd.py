"""Randomized SVD: the subspace of the exact SVD on a gradient with a decaying spectrum."""

from __future__ import annotations

import pytest
import torch

from lit_lowrank.projectors.rsvd import RandomizedSVDProjector
from lit_lowrank.projectors.svd import SVDProjector


def decaying(m: int, n: int, decay: float, seed: int = 0) -> torch.Tensor:
    """U diag(decay^i) Vᵀ with random orthonormal U, V."""
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=generator, dtype=torch.float64))
    return u @ torch.diag(decay ** torch.arange(min(m, n), dtype=torch.float64)) @ v.T


def largest_principal_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle (radians) between span(a) and span(b), both orthonormal d×r."""
    cosines = torch.linalg.svdvals(a.T @ b).clamp(max=1.0)
    return torch.arccos(cosines.min()).item()


@pytest.mark.parametrize("shape", [(120, 80), (80, 120)])
@pytest.mark.parametrize("side", ["std", "reverse_std", "full"])
def test_subspace_matches_exact_svd(shape, side):
    grad = decaying(*shape, decay=0.8)
    exact, fast = SVDProjector(8, side=side), RandomizedSVDProjector(8, side=side, seed=3)
    exact.refresh(grad)
    fast.refresh(grad)
    for want, got in zip(exact.bases(), fast.bases()):
        if want is not None:
            torch.testing.assert_close(got.T @ got, torch.eye(8, dtype=torch.float64))
            assert largest_principal_angle(want, got) < 1e-4


def test_power_iterations_sharpen_a_slow_spectrum():
    grad = decaying(200, 150, decay=0.97)
    exact = SVDProjector(10, side="left")
    exact.refresh(grad)
    angles = []
    for q in (0, 1, 3):
        fast = RandomizedSVDProjector(10, side="left", power_iters=q, oversample=5)
        fast.refresh(grad)
        angles.append(largest_principal_angle(exact.bases()[0], fast.bases()[0]))
    assert angles[0] > angles[1] > angles[2]


def test_sketch_is_seeded_from_index_and_refresh_count():
    grad = torch.randn(40, 30)
    first, again, other = (RandomizedSVDProjector(4, seed=s, power_iters=0, oversample=0) for s in (1, 1, 2))
    for projector in (first, again, other):
        projector.refresh(grad)
    torch.testing.assert_close(first.bases()[1], again.bases()[1], rtol=0, atol=0)
    assert not torch.allclose(first.bases()[1].abs(), other.bases()[1].abs())
    first.refresh(grad)  # second refresh: a new sketch
    assert not torch.allclose(first.bases()[1].abs(), again.bases()[1].abs())


def test_negative_options_are_refused():
    with pytest.raises(ValueError, match="oversample"):
        RandomizedSVDProjector(4, oversample=-1)
