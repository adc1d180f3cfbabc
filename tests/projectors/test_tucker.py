"""The Tucker projector against a plain HOSVD written with einsum."""

from __future__ import annotations

import pytest
import torch

from lit_lowrank.projectors.tucker import TuckerProjector


def hosvd_reference(grad: torch.Tensor, rank: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-mode bases from each unfolding's SVD and the core G ×₁ U₁ᵀ … ×₄ U₄ᵀ, by einsum."""
    bases = []
    for mode in range(grad.ndim):
        unfolding = grad.movedim(mode, 0).reshape(grad.shape[mode], -1).double()
        u = torch.linalg.svd(unfolding, full_matrices=False)[0]
        bases.append(u[:, :min(rank, grad.shape[mode])])
    core = torch.einsum("abcd,ai,bj,ck,dl->ijkl", grad.double(), *bases)
    return bases, core


def test_core_and_lift_match_a_plain_hosvd():
    grad = torch.randn(6, 5, 3, 3, generator=torch.Generator().manual_seed(0))
    projector = TuckerProjector(2)
    projector.refresh(grad)
    bases, core = hosvd_reference(grad, 2)
    for factor, reference in zip(projector.bases(), bases):
        assert factor.shape == reference.shape
        signs = torch.sign((factor.double() * reference).sum(0))  # singular vectors up to sign
        torch.testing.assert_close(factor.double() * signs, reference, rtol=1e-4, atol=1e-5)
    low = projector.project(grad)
    assert low.shape == (2, 2, 2, 2)
    lifted = torch.einsum("ijkl,ai,bj,ck,dl->abcd", core, *bases)
    torch.testing.assert_close(projector.project_back(low).double(), lifted, rtol=1e-4, atol=1e-5)


def test_full_rank_is_the_identity_and_the_projection_is_orthogonal():
    grad = torch.randn(4, 3, 3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    full = TuckerProjector(8)
    full.refresh(grad)
    assert [f.shape[1] for f in full.bases()] == [4, 3, 3, 2]  # each mode clamped to d_k
    torch.testing.assert_close(full.project_back(full.project(grad)), grad)
    low_rank = TuckerProjector(2)
    low_rank.refresh(grad)
    once = low_rank.project_back(low_rank.project(grad))
    torch.testing.assert_close(low_rank.project_back(low_rank.project(once)), once)  # idempotent


def test_add_back_adds_the_scaled_lift_and_state_round_trips():
    grad = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(2))
    projector = TuckerProjector(2)
    projector.refresh(grad)
    low = projector.project(grad)
    target = torch.ones_like(grad)
    projector.add_back_(target, low, alpha=-0.5)
    torch.testing.assert_close(target, 1 - 0.5 * projector.project_back(low))
    restored = TuckerProjector(2)
    restored.load_state_dict(projector.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.bases(), projector.bases()))
    with pytest.raises(ValueError, match="2 or more dimensions"):
        projector.refresh(torch.randn(4))
