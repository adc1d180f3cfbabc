"""Online Subspace Descent's projector: no SVD after (or at) the first refresh, the closed-form
online-PCA gradient against autograd, and the reconstruction error falling on a fixed G."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_lowrank import LowRankOptimizer
from lit_lowrank.projectors.online_pca import OnlinePCAProjector, online_pca_step


@pytest.fixture
def svd_calls(monkeypatch):
    calls = []
    real = torch.linalg.svd

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", counting)
    return calls


def low_rank_gradient(m=48, n=32, spectrum=(6.0, 5.0, 4.0, 3.0, 0.6, 0.3)):
    generator = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(m, len(spectrum), generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(spectrum), generator=generator, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ v.T


def relative_error(grad, projector):
    return (torch.linalg.norm(grad - projector.project_back(projector.project(grad))) / torch.linalg.norm(grad)).item()


@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_reconstruction_error_falls_to_the_svd_optimum(side):
    grad = low_rank_gradient()
    projector = OnlinePCAProjector(4, side=side, power_iters=0)
    errors = []
    for _ in range(25):
        projector.refresh(grad)
        errors.append(relative_error(grad, projector))
    assert all(later <= earlier + 1e-12 for earlier, later in zip(errors, errors[1:]))
    tail = torch.tensor([0.6, 0.3], dtype=torch.float64)
    spectrum = torch.tensor([6.0, 5.0, 4.0, 3.0, 0.6, 0.3], dtype=torch.float64)
    optimum = (tail.norm() / spectrum.norm()).item()  # Eckart–Young
    assert errors[0] > optimum + 1e-2 and errors[-1] == pytest.approx(optimum, abs=1e-3)


def test_no_svd_with_range_init(svd_calls):
    projector = OnlinePCAProjector(4, side="left")
    for _ in range(10):
        projector.refresh(low_rank_gradient())
    assert svd_calls == []


def test_svd_init_takes_one_svd_and_then_none(svd_calls):
    projector = OnlinePCAProjector(4, side="right", init="svd")
    projector.refresh(low_rank_gradient())
    assert len(svd_calls) == 1
    for _ in range(10):
        projector.refresh(low_rank_gradient())
    assert len(svd_calls) == 1


def test_step_is_a_gradient_step_on_the_reconstruction_loss():
    """Closed-form gradient vs autograd of ‖Ĝ − P Pᵀ Ĝ‖² at an orthonormal P, then QR."""
    grad = torch.randn(20, 15, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(20, 3, dtype=torch.float64))
    point = basis.clone().requires_grad_(True)
    scaled = grad / grad.norm()
    loss = (scaled - point @ (point.T @ scaled)).square().sum()
    (gradient,) = torch.autograd.grad(loss, point)
    q, r = torch.linalg.qr(basis - 0.3 * gradient)
    expected = q * torch.sign(torch.diagonal(r))
    torch.testing.assert_close(online_pca_step(basis, grad, lr=0.3), expected)


def test_every_step_schedule_in_the_optimizer_takes_no_svd(svd_calls):
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(24, 16))
    optimizer = LowRankOptimizer([{"params": [weight], "lowrank": True}], rank=4, projector="online-pca",
                                 schedule="every-step")
    for _ in range(6):
        weight.grad = torch.randn(24, 16)
        optimizer.step()
    assert optimizer.refresh_count == 6 and svd_calls == []


def test_options_are_validated():
    with pytest.raises(ValueError, match="expected one of"):
        OnlinePCAProjector(4, init="eig")
    with pytest.raises(ValueError, match="lr"):
        OnlinePCAProjector(4, lr=0)
