"""Sharding a network with FSDP2 so that the low-rank optimizer can step it: each repeated
block, then the root, wrapped with ``fully_shard`` over one 1-D mesh (weights split by rows, see
:mod:`lit_lowrank.optim.sharding`)."""

from __future__ import annotations

from torch import nn

from lit_lowrank.optim.sharding import is_sharded
from lit_lowrank.optim.targets import repeated_blocks


def shard_blocks(network: nn.Module, mesh) -> nn.Module:
    """``fully_shard`` each repeated block of ``network`` (the children of its ``ModuleList`` containers,
    e.g. LLaMA's decoder layers: one all-gather per block in forward and backward), then the root,
    which takes the remaining parameters (embeddings, head, final norm). A no-op for a network
    already sharded. Call it from ``LightningModule.configure_model`` with
    ``self.device_mesh["data_parallel"]``; :class:`~lit_lowrank.lightning.LowRankModule` does.

    Returns ``network`` (sharded in place)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard

    if any(is_sharded(p) for p in network.parameters()):
        return network
    blocks = repeated_blocks(network)
    for name, module in network.named_modules():
        if name in blocks and not any(name.startswith(f"{outer}.") for outer in blocks):
            fully_shard(module, mesh=mesh)
    fully_shard(network, mesh=mesh)
    return network
