"""The SVD-free DCT projector: the DCT-II basis computed plainly, top-r alignment, r integers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft
import torch

from lit_lowrank.projectors.dct import DCTProjector, dct_ii


def dct_matrix(d: int) -> np.ndarray:
    """Orthonormal DCT-II basis, column k = c_k cos(π (2i + 1) k / 2d), written out plainly."""
    out = np.empty((d, d))
    for i in range(d):
        for k in range(d):
            scale = math.sqrt(1 / d) if k == 0 else math.sqrt(2 / d)
            out[i, k] = scale * math.cos(math.pi * (2 * i + 1) * k / (2 * d))
    return out


@pytest.mark.parametrize("d", [7, 16, 33])
def test_fft_transform_equals_the_matrix_and_scipy(d):
    x = torch.randn(5, d, dtype=torch.float64)
    torch.testing.assert_close(dct_ii(x), x @ torch.from_numpy(dct_matrix(d)))
    torch.testing.assert_close(dct_ii(x).numpy(), scipy.fft.dct(x.numpy(), type=2, norm="ortho", axis=-1))


@pytest.mark.parametrize("shape,side", [((40, 24), "std"), ((24, 40), "std"), ((40, 24), "full")])
def test_basis_is_the_most_aligned_dct_columns(shape, side):
    grad = torch.randn(*shape, dtype=torch.float64)
    projector = DCTProjector(5, side=side)
    projector.refresh(grad)
    left, right = projector.bases()
    m, n = shape
    if right is not None:
        matrix = dct_matrix(n)
        scores = np.linalg.norm(grad.numpy() @ matrix, axis=0)  # ‖G d_k‖
        top = np.argsort(-scores)[:5]
        np.testing.assert_allclose(right.numpy(), matrix[:, top], atol=1e-12)
    if left is not None:
        matrix = dct_matrix(m)
        scores = np.linalg.norm(matrix.T @ grad.numpy(), axis=1)  # ‖d_kᵀ G‖
        top = np.argsort(-scores)[:5]
        np.testing.assert_allclose(left.numpy(), matrix[:, top], atol=1e-12)
    for basis in (left, right):
        if basis is not None:
            torch.testing.assert_close(basis.T @ basis, torch.eye(5, dtype=torch.float64))


def test_state_is_r_integers_per_side_plus_scalars():
    projector = DCTProjector(8, side="full")
    projector.refresh(torch.randn(64, 48))
    state = projector.state_dict()
    arrays = {k: v for k, v in state.items() if v.ndim > 0 and v.numel() > 0}
    assert set(arrays) == {"left_indices", "right_indices"}
    assert all(v.numel() == 8 and not v.is_floating_point() for v in arrays.values())
    assert all(v.ndim == 0 or v.numel() == 0 for k, v in state.items() if k not in arrays)


def test_basis_is_exact_for_a_gradient_in_dct_span():
    """A gradient whose rows are combinations of 3 DCT vectors is reproduced exactly."""
    matrix = torch.from_numpy(dct_matrix(32))
    grad = torch.randn(20, 3, dtype=torch.float64) @ matrix[:, [2, 9, 17]].T
    projector = DCTProjector(3, side="right")
    projector.refresh(grad)
    assert sorted(projector.state_dict()["right_indices"].tolist()) == [2, 9, 17]
    torch.testing.assert_close(projector.project_back(projector.project(grad)), grad)
