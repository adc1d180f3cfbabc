"""Weights sharded by FSDP2's ``fully_shard`` (gloo, 2 CPU processes) are refused when the
optimizer is built, naming the supported alternative — never stepped shard by shard."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_lowrank import LowRankOptimizer, build_optimizer
from ranks import requires_gloo, run_ranks


def _worker(rank: int, world_size: int) -> None:
    from torch.distributed.fsdp import fully_shard

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    fully_shard(model)
    with pytest.raises(ValueError, match="sharded by FSDP.*ddp_lowrank"):
        build_optimizer(model, targets=["0", "2"], rank=2)
    with pytest.raises(ValueError, match="sharded by FSDP"):
        LowRankOptimizer([{"params": list(model.parameters()), "lowrank": False}])


@requires_gloo
def test_fully_shard_weights_are_refused():
    run_ranks(_worker)


def test_flat_parameters_are_refused():
    weight = nn.Parameter(torch.zeros(4, 3))
    weight._fsdp_flattened = True  # what FSDP1 marks the original parameters it flattened with
    with pytest.raises(ValueError, match="sharded by FSDP"):
        LowRankOptimizer([{"params": [weight], "lowrank": True}])
