"""The seeded Gaussian projector: the k-th matrix in closed form, O(1) state, orthonormal option."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lit_lowrank.projectors.base import Side
from lit_lowrank.projectors.random import RandomProjector

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def expected_draw(seed: int, k: int, rank: int, dim: int) -> torch.Tensor:
    """The k-th r×d draw of PCG64 seeded by SeedSequence([seed, k]), transposed, over √r."""
    generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, k])))
    return torch.from_numpy(generator.standard_normal((rank, dim), dtype=np.float32)).T / math.sqrt(rank)


@pytest.mark.parametrize("shape,side", [((12, 7), Side.RIGHT), ((7, 12), Side.LEFT)])
def test_kth_matrix_is_seeded_from_index_and_refresh_count(shape, side):
    projector = RandomProjector(3, seed=4)
    draws = []
    for k in range(3):
        projector.refresh(torch.randn(*shape))
        assert projector.side == side
        left, right = projector.bases()
        basis = left if side == Side.LEFT else right
        dim = shape[0] if side == Side.LEFT else shape[1]
        torch.testing.assert_close(basis, expected_draw(4, k, 3, dim), rtol=0, atol=0)
        draws.append(basis)
    assert not torch.allclose(draws[0], draws[1])
    other = RandomProjector(3, seed=5)  # another parameter index: another matrix
    other.refresh(torch.randn(*shape))
    assert not torch.allclose(other.bases()[side == Side.RIGHT], draws[0])


def test_full_side_draws_left_then_right_from_one_generator():
    projector = RandomProjector(2, side="full", seed=1)
    projector.refresh(torch.randn(5, 6))
    generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence([1, 0])))
    left = torch.from_numpy(generator.standard_normal((2, 5), dtype=np.float32)).T
    right = torch.from_numpy(generator.standard_normal((2, 6), dtype=np.float32)).T
    torch.testing.assert_close(projector.bases()[0], left / math.sqrt(2), rtol=0, atol=0)
    torch.testing.assert_close(projector.bases()[1], right / math.sqrt(2), rtol=0, atol=0)


def test_state_is_seed_and_counters_not_the_matrix():
    projector = RandomProjector(16, seed=3)
    projector.refresh(torch.randn(256, 128))
    state = projector.state_dict()
    assert sum(t.numel() for t in state.values()) <= 6  # side, refreshes, seed, (m, n), empty dtype carrier
    assert state["like"].numel() == 0 and state["like"].dtype == torch.float32


def test_orthonormal_option_spans_the_same_gaussian_subspace():
    grad = torch.randn(10, 30, dtype=torch.float64)
    gaussian, orthonormal = RandomProjector(4, seed=2), RandomProjector(4, seed=2, orthonormal=True)
    gaussian.refresh(grad)
    orthonormal.refresh(grad)
    basis = orthonormal.bases()[0]
    torch.testing.assert_close(basis.T @ basis, torch.eye(4, dtype=torch.float64))
    draw = gaussian.bases()[0]
    torch.testing.assert_close(basis @ (basis.T @ draw), draw)  # draw lies in span(basis)


@requires_cuda
def test_same_matrix_on_cuda_as_on_cpu():
    cpu, gpu = RandomProjector(4, seed=9), RandomProjector(4, seed=9)
    cpu.refresh(torch.randn(20, 8))
    gpu.refresh(torch.randn(20, 8, device="cuda"))
    torch.testing.assert_close(gpu.bases()[1].cpu(), cpu.bases()[1], rtol=0, atol=0)
