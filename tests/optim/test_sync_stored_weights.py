"""``sync_module_states`` on a model holding INT8 weights (2 gloo processes): the weights, stored
in buffers behind storage-less handles, become rank 0's on every rank."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_lowrank import transforms
from lit_lowrank.optim.communication import sync_module_states
from ranks import requires_gloo, run_ranks


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    transforms.prepare(net, {"int-weights": {}}, ["0", "2"])
    return net


def _weights(net: nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter's value: a stored weight's float weight, else the parameter."""
    return {name: transforms.stored_weight(p).float_weight() if transforms.stored_weight(p) else p.detach()
            for name, p in net.named_parameters()}


def _worker(rank: int, world_size: int, out: str) -> None:
    net = _net(seed=rank)  # other weights on each rank
    sync_module_states(net)
    torch.save(_weights(net), f"{out}/weights{rank}.pt")


@pytest.mark.slow
@requires_gloo
def test_stored_weights_become_rank_zeros(tmp_path):
    run_ranks(_worker, str(tmp_path))
    expected = _weights(_net(seed=0))
    assert not torch.equal(_weights(_net(seed=1))["0.weight"], expected["0.weight"])  # rank 1 started elsewhere
    for rank in (0, 1):
        weights = torch.load(tmp_path / f"weights{rank}.pt")
        assert weights.keys() == expected.keys()
        for name, value in expected.items():
            assert torch.equal(weights[name], value), (rank, name)
