"""Side policies and the project / project_back / add_back_ mechanics of every side."""

from __future__ import annotations

import pytest
import torch

from lit_lowrank.projectors.base import Side, choose_side
from lit_lowrank.projectors.dct import DCTProjector
from lit_lowrank.projectors.svd import SVDProjector

SHAPES = [(12, 8), (8, 12), (10, 10)]
EXPECTED_SIDE = {  # policy -> (side for m >= n, side for m < n)
    "std": (Side.RIGHT, Side.LEFT),
    "reverse_std": (Side.LEFT, Side.RIGHT),
    "left": (Side.LEFT, Side.LEFT),
    "right": (Side.RIGHT, Side.RIGHT),
    "full": (Side.BOTH, Side.BOTH),
}


@pytest.mark.parametrize("policy", list(EXPECTED_SIDE))
@pytest.mark.parametrize("shape", SHAPES)
def test_side_policy(policy, shape):
    m, n = shape
    assert choose_side(policy, shape) == EXPECTED_SIDE[policy][0 if m >= n else 1]


def test_unknown_side_policy_is_refused():
    with pytest.raises(ValueError, match="expected one of"):
        SVDProjector(4, side="diagonal")


def _low_shape(side: Side, m: int, n: int, r: int) -> tuple[int, int]:
    return {Side.LEFT: (r, n), Side.RIGHT: (m, r), Side.BOTH: (r, r)}[side]


@pytest.mark.parametrize("policy", list(EXPECTED_SIDE))
@pytest.mark.parametrize("shape", SHAPES)
def test_projection_shapes_and_lift(policy, shape):
    m, n, r = *shape, 3
    grad = torch.randn(m, n, dtype=torch.float64)
    projector = SVDProjector(r, side=policy)
    projector.refresh(grad)
    low = projector.project(grad)
    assert low.shape == _low_shape(projector.side, m, n, r)
    left, right = projector.bases()
    expected_low = grad
    if left is not None:
        assert left.shape == (m, r)
        expected_low = left.T @ expected_low
    if right is not None:
        assert right.shape == (n, r)
        expected_low = expected_low @ right
    torch.testing.assert_close(low, expected_low)
    lifted = projector.project_back(low)
    assert lifted.shape == (m, n)
    # Lifting the projection is the orthogonal projection onto the subspace: idempotent.
    torch.testing.assert_close(projector.project_back(projector.project(lifted)), lifted)
    target = torch.randn(m, n, dtype=torch.float64)
    torch.testing.assert_close(projector.add_back_(target.clone(), low, alpha=-0.5), target - 0.5 * lifted)


def test_side_is_stored_not_rederived():
    """A square low-rank tensor (r == m) must not flip the side (galore-torch's reverse_std bug)."""
    grad = torch.randn(4, 9)
    projector = SVDProjector(4, side="reverse_std")
    projector.refresh(grad)
    assert projector.side == Side.RIGHT
    low = projector.project(grad)
    assert low.shape == (4, 4)
    torch.testing.assert_close(projector.project_back(low), grad @ projector.bases()[1] @ projector.bases()[1].T)


def test_non_2d_gradient_is_refused():
    with pytest.raises(ValueError, match="takes 2-D gradients"):
        DCTProjector(2).refresh(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match=r"takes 2-D or 3-D \(E×m×n\) gradients"):
        SVDProjector(2).refresh(torch.randn(2, 3, 4, 5))


def test_use_before_refresh_is_an_error():
    with pytest.raises(RuntimeError, match="before its first refresh"):
        SVDProjector(2).project(torch.randn(3, 4))


@pytest.mark.parametrize("policy", list(EXPECTED_SIDE))
def test_state_dict_round_trip(policy):
    grad = torch.randn(7, 5)
    projector = SVDProjector(3, side=policy)
    projector.refresh(grad)
    state = projector.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    restored = SVDProjector(3, side=policy)
    restored.load_state_dict(state)
    assert restored.side == projector.side and restored.refreshes == 1
    torch.testing.assert_close(restored.project(grad), projector.project(grad), rtol=0, atol=0)
