"""Placements (lit_lowrank/optim/placement.py): what a weight held whole and a rank's rows of a
weight split by FSDP2 give the step, checked against torch.chunk's blocks (FSDP2's rule) on a
stand-in mesh of three ranks, seen from the middle one (no process group needed for what is local)."""

from __future__ import annotations

import pytest
import torch

from lit_lowrank import LowRankOptimizer
from lit_lowrank.optim.layouts import View
from lit_lowrank.optim.placement import WHOLE, Placements, RowsOfWeight
from lit_lowrank.optim.sharding import RowShard
from lit_lowrank.projectors.svd import SVDProjector

M, N, RANK, RANKS, HERE = 10, 7, 3, 3, 1


class StandInMesh:
    """What a RowShard reads of its device mesh for this rank's blocks: the ranks along the split and ours."""

    def size(self, dim: int) -> int:
        return RANKS

    def get_local_rank(self, dim: int) -> int:
        return HERE


def _rows(mesh=None) -> RowsOfWeight:
    return RowsOfWeight(RowShard(mesh or StandInMesh(), torch.Size((M, N))))


def _projector(side: str) -> SVDProjector:
    projector = SVDProjector(RANK, side=side)
    projector.refresh(torch.randn(M, N, generator=torch.Generator().manual_seed(0)))
    return projector


def test_a_weight_held_whole_is_its_own_part():
    grad, low, projector = torch.randn(M, N), torch.randn(RANK, N), _projector("left")
    assert WHOLE.local(grad) is grad and WHOLE.whole_gradient(grad, None) is grad
    assert WHOLE.applied(projector, stacked=False) is projector
    assert WHOLE.state_part(low, projector) is low and WHOLE.state_split(View(torch.Size((M, N))), projector, False) is None
    state = {"exp_avg": low}
    assert WHOLE.distributed(state, None) is state and WHOLE.localized(state, None) is state


def test_rows_of_a_weight_see_their_block_of_rows_and_of_r():
    rows_here = torch.chunk(torch.arange(M), RANKS)[HERE]
    placement, left, right = _rows(), _projector("left"), _projector("right")
    view = View(torch.Size((M, N)))
    assert placement.local_view(view, torch.randn(len(rows_here), N)).shape == (len(rows_here), N)
    torch.testing.assert_close(placement.applied(left, stacked=False).bases()[0], left.bases()[0][rows_here])
    low = torch.randn(RANK, N)  # a left projection's R is whole on every rank: moments for a block of its columns
    torch.testing.assert_close(placement.state_part(low, placement.applied(left, False)), torch.chunk(low, RANKS, -1)[HERE])
    assert placement.state_split(view, left, False) == (-1, N)
    low = torch.randn(len(rows_here), RANK)  # a right projection's R is split by rows like G
    assert placement.state_part(low, placement.applied(right, False)) is low
    assert placement.state_split(view, right, False) == (0, M)


def test_rows_of_a_weight_localize_saved_state_to_their_block():
    placement, whole = _rows(), torch.randn(RANK, N)
    localized = placement.localized({"exp_avg": whole, "step": torch.tensor(3.0)}, (-1, N))
    torch.testing.assert_close(localized["exp_avg"], torch.chunk(whole, RANKS, -1)[HERE])
    assert localized["step"] == 3.0


def test_placements_refuse_two_meshes_and_name_a_weight_left_whole():
    weights = [torch.zeros(M, N) for _ in range(3)]
    placements = Placements()
    placements.admit({weights[0]: _rows(), weights[1]: WHOLE})
    assert placements.sharded and placements.whole_beside_rows() is weights[1]
    with pytest.raises(ValueError, match="different device meshes"):
        placements.admit({weights[2]: _rows()})  # another StandInMesh: not the same mesh


def test_every_parameter_of_a_single_process_optimizer_is_held_whole():
    weight, bias = torch.nn.Parameter(torch.randn(M, N)), torch.nn.Parameter(torch.randn(M))
    optimizer = LowRankOptimizer([{"params": [weight], "lowrank": True}, {"params": [bias]}], rank=RANK)
    assert not optimizer.sharded and list(optimizer._placements.values()) == [WHOLE, WHOLE]
    assert optimizer._placements.agreed(1, 2) == 1 and optimizer._placements.agreed(None, 2) is None
