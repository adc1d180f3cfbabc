"""The exact-SVD projector recovers the leading singular subspace."""

from __future__ import annotations

import numpy as np
import torch

from lit_lowrank.projectors.svd import SVDProjector


def _matrix_with_spectrum(m: int, n: int, singular_values: list[float], seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, m)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    k = len(singular_values)
    return torch.from_numpy(u[:, :k] @ np.diag(singular_values) @ v[:, :k].T)


def test_bases_span_the_leading_singular_vectors():
    grad = _matrix_with_spectrum(20, 12, [10.0, 5.0, 2.0, 0.1, 0.05])
    u, _, vt = np.linalg.svd(grad.numpy())
    for policy, compare in (("left", u[:, :3]), ("right", vt[:3].T)):
        projector = SVDProjector(3, side=policy)
        projector.refresh(grad)
        basis = next(b for b in projector.bases() if b is not None).numpy()
        # Same subspace: the projector onto it is sign- and rotation-invariant.
        np.testing.assert_allclose(basis @ basis.T, compare @ compare.T, atol=1e-10)
        np.testing.assert_allclose(basis.T @ basis, np.eye(3), atol=1e-10)


def test_rank_r_gradient_is_reconstructed_exactly():
    grad = _matrix_with_spectrum(16, 24, [3.0, 2.0, 1.0])
    projector = SVDProjector(3)
    projector.refresh(grad)
    torch.testing.assert_close(projector.project_back(projector.project(grad)), grad)


def test_bf16_gradient_gets_float32_svd_and_bf16_basis():
    grad = torch.randn(16, 8).to(torch.bfloat16)
    projector = SVDProjector(4)
    projector.refresh(grad)
    (_, right) = projector.bases()
    assert right.dtype == torch.bfloat16
    _, _, vt = torch.linalg.svd(grad.float(), full_matrices=False)
    torch.testing.assert_close(right, vt[:4].T.to(torch.bfloat16))
