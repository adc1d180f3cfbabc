"""scripts/compare_projectors.py: the subspace scores against plain computations, the tracking
of svd-warm over consecutive refreshes, and the training run that feeds it (tiny shapes)."""

from __future__ import annotations

import math

import pytest
import torch
from script_loader import loaded_script

from lit_lowrank.projectors.svd import SVDProjector
from lit_lowrank.projectors.svd_warm import WarmSVDProjector


@pytest.fixture(scope="module")
def script():
    yield from loaded_script("compare_projectors")


def rotated(basis: torch.Tensor, angle: float) -> torch.Tensor:
    """``basis`` (d×r, orthonormal, d ≥ 2r) with every column turned by ``angle`` towards a
    column of the orthogonal complement."""
    d, r = basis.shape
    complement = torch.linalg.qr(torch.cat([basis, torch.eye(d, dtype=basis.dtype)], 1))[0][:, r:2 * r]
    return math.cos(angle) * basis + math.sin(angle) * complement


def test_quality_is_the_angle_and_the_energy_ratio(script):
    """On G = U diag(σ) Vᵀ: a basis turned by θ from the top-r left vectors has largest angle θ to
    the top-r/4 and keeps cos²θ of the energy (its turn goes into directions G does not have)."""
    generator = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(40, 8, generator=generator, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(30, 8, generator=generator, dtype=torch.float64))[0]
    grad = u @ torch.diag(torch.linspace(8, 1, 8, dtype=torch.float64)) @ v.T
    exact = u[:, :4]
    complement_of_g = torch.linalg.qr(torch.cat([u, torch.eye(40, dtype=torch.float64)], 1))[0][:, 8:12]
    turned = math.cos(0.3) * exact + math.sin(0.3) * complement_of_g
    angle, energy = script.quality(exact, turned, grad)
    assert angle == pytest.approx(math.degrees(0.3), rel=1e-6)
    assert energy == pytest.approx(math.cos(0.3) ** 2, rel=1e-6)


def test_tracking_scores_every_refresh_and_the_stale_basis(script):
    """Gradients (48×32: the projected side is the right one) whose right singular subspace turns
    by 0.2 rad between refreshes: the stale basis scores from the second refresh on, at about
    that angle and cos² of the energy; the tracked ones as the exact SVD."""
    generator = torch.Generator().manual_seed(0)
    singular = torch.cat([torch.linspace(10, 6, 8), 0.1 * torch.ones(8)]).double()
    u = torch.linalg.qr(torch.randn(48, 16, generator=generator, dtype=torch.float64))[0]
    base = torch.linalg.qr(torch.randn(32, 16, generator=generator, dtype=torch.float64))[0]
    rights = [base, rotated(base, 0.2), rotated(base, 0.4)]
    refreshes = [(10 * k, 1.0, {"48x32": (u @ torch.diag(singular) @ right.T).float()})
                 for k, right in enumerate(rights)]
    rows = list(script.tracking_rows(iter(refreshes), rank=8))
    assert [(step, label) for step, _, label, _ in rows] == [(0, "48x32"), (10, "48x32"), (20, "48x32")]
    assert "stale svd" not in rows[0][3] and "stale svd" in rows[1][3]
    for _, _, _, scores in rows:
        for variant in (*script.TRACKED, "rsvd q=2"):
            assert scores[variant][1] > 0.9999
    stale_angle, stale_energy = rows[1][3]["stale svd"]
    assert stale_angle == pytest.approx(math.degrees(0.2), rel=1e-3)
    assert stale_energy == pytest.approx(math.cos(0.2) ** 2, rel=1e-3)


def test_a_training_run_yields_the_gradients_at_each_refresh(script):
    refreshes = list(script.training_refreshes("galore-warm", rank=4, gap=2, refreshes=2, batch=2, seq_len=16,
                                               lr=1e-2, device="cpu", hidden_size=32, intermediate_size=48))
    assert [step for step, _, _ in refreshes] == [0, 2]
    shapes = {label: tuple(grad.shape) for label, grad in refreshes[0][2].items()}
    assert list(shapes.values()) == [(32, 32), (48, 32), (32, 48)]
    assert all(math.isfinite(loss) for _, loss, _ in refreshes)
    assert not torch.equal(refreshes[0][2]["512x512 (q/k/v/o)"], refreshes[1][2]["512x512 (q/k/v/o)"])


def test_timed_refreshes_time_every_variant_and_warm_start_the_warm_ones(script):
    """Each variant timed; a warm-started projector's basis is the one of its refresh on ``grad``
    after a first refresh on ``start`` (svd-warm: not the exact SVD of ``grad``)."""
    generator = torch.Generator().manual_seed(0)
    grad, start = (torch.randn(24, 16, generator=generator) for _ in range(2))
    results = script.timed_refreshes(grad, start, rank=4, repeats=2)
    assert list(results) == list(script.VARIANTS) and all(0 < best <= ms for ms, best, _ in results.values())
    warm, exact = WarmSVDProjector(4, seed=1), SVDProjector(4, seed=1)
    warm.refresh(start)
    warm.refresh(grad)
    exact.refresh(grad)
    assert torch.equal(results["svd-warm it=1"][2], warm.bases()[1])
    assert torch.equal(results["svd"][2], exact.bases()[1])
    assert not torch.allclose(results["svd-warm it=1"][2].abs(), exact.bases()[1].abs())
