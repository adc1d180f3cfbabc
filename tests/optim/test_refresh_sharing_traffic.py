"""``comm_bytes`` counts the projector states that refresh sharing broadcasts (gloo, 2 CPU
processes): on each rank, the bytes of every broadcast it takes part in — the payload of a
collective, as an all-reduced gradient is counted — which is, summed over the weights refreshed
that step, each projector's whole state (the r·d basis, its side and refresh counter)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lit_lowrank import build_optimizer
from lit_lowrank.optim.communication import LowRankCommunication, lowrank_comm_hook
from ranks import requires_gloo, run_ranks

STEPS, GAP, RANK = 5, 2, 3
SIZES = [12, 20, 14, 12, 4]  # four target weights: 20×12, 14×20, 12×14, 4×12
OPTIONS = dict(targets=["layers"], rank=RANK, update_gap=GAP, lr=1e-2, scale=1.0)


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(a, b, dtype=torch.float64) for a, b in zip(SIZES, SIZES[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))
        return self.layers[-1](x)


def state_bytes_per_refresh() -> int:
    """Closed form: per m×n weight an m×r or r×n float64 basis on its smaller side (r·min(m, n)
    numbers of 8 bytes), plus the side and the refresh counter (two int64 scalars)."""
    return sum(RANK * min(m, n) * 8 + 2 * 8 for n, m in zip(SIZES, SIZES[1:]))


def refreshes(step: int) -> bool:
    """Every weight refreshes at steps 0, T, 2T, ... (the fixed schedule, not staggered)."""
    return step % GAP == 0


def train(model: nn.Module, optimizer, rank: int, world_size: int, hook: LowRankCommunication | None = None,
          ) -> list[tuple[int | None, int]]:
    """Per step: the optimizer's ``comm_bytes``, and the gradient bytes the hook counted (0 without)."""
    generator = torch.Generator().manual_seed(0)
    counted = []
    for _ in range(STEPS):
        inputs = torch.randn(8, 12, generator=generator, dtype=torch.float64)
        targets = torch.randn(8, 4, generator=generator, dtype=torch.float64)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs[rank::world_size]), targets[rank::world_size]).backward()
        optimizer.step()
        counted.append((optimizer.comm_bytes, sum(hook.sent_bytes.values()) if hook else 0))
    return counted


def _worker(rank: int, world_size: int, out: str) -> None:
    results = {}
    for sharing in ("on", "off"):  # plain torch DDP: the optimizer counts no gradient traffic
        model = Stack()
        optimizer = build_optimizer(model, **OPTIONS, refresh_sharing=sharing)
        results[sharing] = train(DistributedDataParallel(model), optimizer, rank, world_size)
    model = Stack()  # lit_lowrank's communication: it counts the gradients, the step adds the broadcast
    optimizer = build_optimizer(model, **OPTIONS)
    ddp = DistributedDataParallel(model)
    hook = LowRankCommunication(optimizer)
    ddp.register_comm_hook(hook, lowrank_comm_hook)
    results["hook"] = train(ddp, optimizer, rank, world_size, hook)
    torch.save(results, f"{out}/rank{rank}.pt")


@requires_gloo
@pytest.mark.slow
def test_comm_bytes_count_the_broadcast_projector_states(tmp_path):
    run_ranks(_worker, str(tmp_path))
    expected = state_bytes_per_refresh()
    for rank in (0, 1):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        assert [sent for sent, _ in results["on"]] == [expected if refreshes(s) else 0 for s in range(STEPS)]
        assert [sent for sent, _ in results["off"]] == [None] * STEPS  # nothing of the optimizer's own to count
        for step, (sent, gradients) in enumerate(results["hook"]):
            assert gradients > 0
            assert sent == gradients + (expected if refreshes(step) else 0), (rank, step)
