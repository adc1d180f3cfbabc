"""DDP (gloo, 2 CPU processes): every rank holds the same projector, and training equals the
single-process run on the whole batch."""

from __future__ import annotations

import pytest

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lit_lowrank import build_optimizer
from ranks import requires_gloo, run_ranks

OPTIONS = dict(targets=["attn", "mlp"], rank=3, update_gap=2, lr=1e-2, scale=1.0)  # Block has no repeated blocks
STEPS = 5


class Block(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.Linear(12, 16, dtype=dtype)
        self.mlp = nn.Linear(16, 4, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.tanh(self.attn(x)))


def batches(steps: int = STEPS, dtype: torch.dtype = torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 12, generator=generator).to(dtype), torch.randn(8, 4, generator=generator).to(dtype))
            for _ in range(steps)]


def rank_share(batch_list, rank: int, world_size: int):
    return [(x[rank::world_size], y[rank::world_size]) for x, y in batch_list]


def train(model: nn.Module, optimizer, batch_list) -> None:
    for inputs, targets in batch_list:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()


def flat_bases(optimizer) -> list[torch.Tensor]:
    return [t for projector in optimizer.projectors.values() for t in projector.bases() if t is not None]


def _worker(rank: int, world_size: int, out: str) -> None:
    model = Block()
    optimizer = build_optimizer(model, **OPTIONS)
    train(DistributedDataParallel(model), optimizer, rank_share(batches(), rank, world_size))
    torch.save({"params": [p.detach() for p in model.parameters()], "bases": flat_bases(optimizer)},
               f"{out}/rank{rank}.pt")


@pytest.mark.slow
@requires_gloo
def test_ddp_ranks_agree_and_match_single_process(tmp_path):
    run_ranks(_worker, str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for a, b in zip(rank0["params"] + rank0["bases"], rank1["params"] + rank1["bases"]):
        assert torch.equal(a, b)
    model = Block()
    train(model, build_optimizer(model, **OPTIONS), batches())
    for ours, single in zip(rank0["params"], model.parameters()):
        torch.testing.assert_close(ours, single.detach(), rtol=1e-9, atol=1e-9)
