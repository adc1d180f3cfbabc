"""Two "nodes" on one machine (``num_nodes=2``, 127.0.0.1): each started as torchrun or SLURM
starts a node's process, Lightning joins them, and both end with the same weights."""

from __future__ import annotations

import pytest

import os
import subprocess
import sys
from pathlib import Path

import torch

from ranks import free_port, requires_gloo

HERE = Path(__file__).parent


@pytest.mark.slow
@requires_gloo
def test_two_nodes_train_the_same_weights(tmp_path):
    port = free_port()
    nodes = []
    for node_rank in (0, 1):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(node_rank),
               "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
        nodes.append(subprocess.Popen([sys.executable, str(HERE / "two_node_worker.py"), str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for node in nodes:
        output, _ = node.communicate(timeout=300)
        assert node.returncode == 0, output[-3000:]
    first, second = (torch.load(tmp_path / f"node{n}.pt") for n in (0, 1))
    assert (first["global_rank"], second["global_rank"]) == (0, 1)
    assert first["world_size"] == second["world_size"] == 2
    for a, b in zip(first["params"], second["params"]):
        assert torch.equal(a, b)
    assert first["comm_bytes"].item() > 0  # low-rank communication ran across the nodes
