"""Low-rank gradient communication (gloo, 2 CPU processes): all-reducing ``R = PᵀG`` trains the
same weights as DDP's full all-reduce, and sends ``r·max(m, n)`` numbers per target weight."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lit_lowrank import build_optimizer, get_method, get_update_rule
from lit_lowrank.optim.communication import LowRankCommunication, lowrank_comm_hook
from ranks import requires_gloo, run_ranks
from test_distributed import OPTIONS, Block, batches, flat_bases, rank_share

STEPS = 8  # update_gap 2: refreshes at steps 1, 3, 5, 7


def _step(model: nn.Module, optimizer, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    optimizer.zero_grad()
    nn.functional.mse_loss(model(inputs), targets).backward()
    optimizer.step()


def _ddp_pair(make, options: dict):
    """The same model twice under DDP: plain all-reduce, and low-rank communication's hook."""
    plain, ours = make(), make()
    plain_optimizer, our_optimizer = build_optimizer(plain, **options), build_optimizer(ours, **options)
    plain_ddp, our_ddp = DistributedDataParallel(plain), DistributedDataParallel(ours)
    communication = LowRankCommunication(our_optimizer)
    our_ddp.register_comm_hook(communication, lowrank_comm_hook)
    return (plain, plain_ddp, plain_optimizer), (ours, our_ddp, our_optimizer), communication


def _worker(rank: int, world_size: int, out: str, method: str) -> None:
    (plain, plain_ddp, plain_optimizer), (ours, our_ddp, our_optimizer), communication = _ddp_pair(
        lambda: Block(torch.float32), {**OPTIONS, "method": method})
    log = []
    for inputs, targets in rank_share(batches(STEPS, torch.float32), rank, world_size):
        _step(plain_ddp, plain_optimizer, inputs, targets)
        refreshes = our_optimizer.refresh_count
        ranks = {p: projector.rank for p, projector in our_optimizer.projectors.items()}  # as communicated
        _step(our_ddp, our_optimizer, inputs, targets)
        log.append({**communication.sent_bytes, "comm_bytes": our_optimizer.comm_bytes,
                    "refreshed": our_optimizer.refresh_count > refreshes,
                    "r_max_mn": sum(r * max(p.shape) * 4 for p, r in ranks.items())})
    torch.save({"plain": [p.detach() for p in plain.parameters()], "ours": [p.detach() for p in ours.parameters()],
                "bases": flat_bases(our_optimizer), "log": log}, f"{out}/rank{rank}.pt")


@requires_gloo
def test_lowrank_communication_matches_ddp_and_sends_r_max_mn(tmp_path):
    run_ranks(_worker, str(tmp_path), "galore")
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for a, b in zip(rank0["ours"] + rank0["bases"], rank1["ours"] + rank1["bases"]):
        assert torch.equal(a, b)
    for ours, plain in zip(rank0["ours"], rank0["plain"]):
        torch.testing.assert_close(ours, plain, rtol=1e-6, atol=1e-6 * plain.abs().max().item())
    model, rank = Block(torch.float32), OPTIONS["rank"]
    targets = [model.attn.weight, model.mlp.weight]
    low_rank_bytes = sum(rank * max(w.shape) * 4 for w in targets)
    all_bytes = sum(p.numel() * 4 for p in model.parameters())
    log = rank0["log"]
    assert sum(entry["refreshed"] for entry in log) >= 3
    for entry in log:
        assert entry["comm_bytes"] == entry["lowrank"] + entry["full"]
        if entry["refreshed"]:
            assert (entry["lowrank"], entry["full"]) == (0, all_bytes)
        else:
            assert entry["lowrank"] == low_rank_bytes
            assert entry["full"] == all_bytes - sum(w.numel() * 4 for w in targets)  # the biases


@requires_gloo
@pytest.mark.parametrize("method", ["galore-rsvd", "galore-random", "adaptive-rank", "galore-adafactor", "online-pca",
                                    "fira", "apollo"])
def test_every_method_trains_ddp_weights(tmp_path, method):
    """The methods' projectors and rules under low-rank communication: plain DDP's weights; ``R``
    on the steps that take it, the full gradient where the rule reads ``G`` (Fira, APOLLO) or
    the basis is refit every step (online PCA)."""
    run_ranks(_worker, str(tmp_path), method)
    rank0 = torch.load(tmp_path / "rank0.pt")
    for ours, plain in zip(rank0["ours"], rank0["plain"]):
        torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item())
    reads_gradient = get_update_rule(get_method(method).options.get("rule", "galore")).uses_gradient
    for entry in rank0["log"]:
        sends_r = not entry["refreshed"] and not reads_gradient
        assert entry["lowrank"] == (entry["r_max_mn"] if sends_r else 0)
    assert any(entry["lowrank"] for entry in rank0["log"]) == (method not in ("fira", "apollo", "online-pca"))


def test_communication_needs_a_lowrank_optimizer():
    model = Block()
    with pytest.raises(TypeError, match="LowRankOptimizer"):
        LowRankCommunication(torch.optim.AdamW(model.parameters()))


class StackedBlock(nn.Module):
    """Input 12 → a 1×1 conv kernel (16×12×1, matricized) → a stack of 3 experts (3×4×16),
    every expert applied and summed: both kinds of non-matrix targets under DDP."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(12, 16, 1)
        self.experts = nn.Module()
        self.experts.stack = nn.Parameter(torch.randn(3, 4, 16) / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.conv(x.unsqueeze(-1)).squeeze(-1))
        return torch.einsum("bn,emn->bm", hidden, self.experts.stack)


def _stacked_worker(rank: int, world_size: int, out: str) -> None:
    (plain, plain_ddp, plain_optimizer), (ours, our_ddp, our_optimizer), communication = _ddp_pair(
        StackedBlock, {**OPTIONS, "targets": ["conv", "experts"]})
    sent = []
    for inputs, targets in rank_share(batches(STEPS, torch.float32), rank, world_size):
        _step(plain_ddp, plain_optimizer, inputs, targets)
        _step(our_ddp, our_optimizer, inputs, targets)
        sent.append(communication.sent_bytes["lowrank"])
    torch.save({"plain": [p.detach() for p in plain.parameters()], "ours": [p.detach() for p in ours.parameters()],
                "layouts": sorted(g.get("layout", "matrix") for g in our_optimizer.param_groups if g["lowrank"]),
                "sent": sent}, f"{out}/rank{rank}.pt")


@requires_gloo
def test_expert_stacks_and_conv_kernels_communicate_their_projections(tmp_path):
    run_ranks(_stacked_worker, str(tmp_path))
    rank0 = torch.load(tmp_path / "rank0.pt")
    assert rank0["layouts"] == ["experts", "kernel"]
    for ours, plain in zip(rank0["ours"], rank0["plain"]):
        torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item())
    rank = OPTIONS["rank"]
    between_refreshes = rank * 16 * 4 + 3 * rank * 16 * 4  # conv 16×12: R 16×r; stack 3×4×16: R 3×r×16
    assert rank0["sent"][1::2] == [between_refreshes] * (STEPS // 2)
