"""DDP (gloo, 2 CPU processes): every rank holds the same projector, and training equals the
single-process run on the whole batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lit_lowrank import build_optimizer

OPTIONS = dict(targets=["attn", "mlp"], rank=3, update_gap=2, lr=1e-2, scale=1.0)  # Block has no repeated blocks
STEPS = 5


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.Linear(12, 16, dtype=torch.float64)
        self.mlp = nn.Linear(16, 4, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.tanh(self.attn(x)))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 12, generator=generator, dtype=torch.float64),
             torch.randn(8, 4, generator=generator, dtype=torch.float64)) for _ in range(STEPS)]


def _train(model: nn.Module, optimizer, batches) -> None:
    for inputs, targets in batches:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    model = Block()
    ddp = DistributedDataParallel(model)
    optimizer = build_optimizer(model, **OPTIONS)
    half = [(x[rank::world_size], y[rank::world_size]) for x, y in _batches()]
    _train(ddp, optimizer, half)
    bases = [projector.bases() for projector in optimizer.projectors.values()]
    torch.save({"params": [p.detach() for p in model.parameters()], "bases": bases}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ddp_ranks_agree_and_match_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for a, b in zip(rank0["params"] + [t for pair in rank0["bases"] for t in pair if t is not None],
                    rank1["params"] + [t for pair in rank1["bases"] for t in pair if t is not None]):
        assert torch.equal(a, b)
    model = Block()
    _train(model, build_optimizer(model, **OPTIONS), _batches())
    for ours, single in zip(rank0["params"], model.parameters()):
        torch.testing.assert_close(ours, single.detach(), rtol=1e-9, atol=1e-9)
