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


@pytest.mark.slow
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
    # refresh sharing (the hook marks the gradients identical): each refreshed projector's state,
    # its r·min(m, n) float32 basis and two int64 scalars, broadcast to every rank
    broadcast = sum(rank * min(w.shape) * 4 + 2 * 8 for w in targets)
    for entry in log:
        assert entry["comm_bytes"] == entry["lowrank"] + entry["full"] + (broadcast if entry["refreshed"] else 0)
        if entry["refreshed"]:
            assert (entry["lowrank"], entry["full"]) == (0, all_bytes)
        else:
            assert entry["lowrank"] == low_rank_bytes
            assert entry["full"] == all_bytes - sum(w.numel() * 4 for w in targets)  # the biases


@pytest.mark.slow
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


@pytest.mark.slow
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


# ---------------------------------------------------------------- plain-PyTorch loops around the hook
LOOP_STEPS = 4  # update_gap 2: steps 0 and 2 refresh (full gradients), steps 1 and 3 read the averaged R


def _accumulated(model, optimizer, inputs, targets, tools, no_sync: bool = False) -> None:
    """Two micro-batches per step; with ``no_sync`` only the second communicates."""
    optimizer.zero_grad()
    for i in range(2):
        skip_sync = no_sync and i == 0
        with model.no_sync() if skip_sync else torch.enable_grad():
            nn.functional.mse_loss(model(inputs[i::2]), targets[i::2]).div(2).backward()
    optimizer.step()


def _scaled(model, optimizer, inputs, targets, tools) -> None:
    scaler = tools.setdefault(id(optimizer), torch.amp.GradScaler("cpu", init_scale=2.0**10))
    optimizer.zero_grad()
    scaler.scale(nn.functional.mse_loss(model(inputs), targets)).backward()
    scaler.step(optimizer)
    scaler.update()


def _clipped(model, optimizer, inputs, targets, tools) -> None:
    optimizer.zero_grad()
    nn.functional.mse_loss(model(inputs), targets).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.1)
    optimizer.step()


def _clipped_in_closure(model, optimizer, inputs, targets, tools) -> None:
    def closure():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.1)
        return loss

    optimizer.step(closure)


LOOPS = {"accumulated": _accumulated, "accumulated_no_sync": lambda *a: _accumulated(*a, no_sync=True),
         "scaled": _scaled, "clipped": _clipped, "clipped_in_closure": _clipped_in_closure}


def _loop_worker(rank: int, world_size: int, out: str, loop: str, method: str) -> None:
    """Plain DDP and the hook through the same loop; stops at the first step the hook refuses,
    saving both models' weights from before that step."""
    (plain, plain_ddp, plain_optimizer), (ours, our_ddp, our_optimizer), _ = _ddp_pair(
        lambda: Block(torch.float32), {**OPTIONS, "method": method})
    tools, result = {}, {"error": None}
    for step, (inputs, targets) in enumerate(rank_share(batches(LOOP_STEPS, torch.float32), rank, world_size)):
        plain_before, ours_before = ([p.detach().clone() for p in m.parameters()] for m in (plain, ours))
        LOOPS[loop](plain_ddp, plain_optimizer, inputs, targets, tools)
        try:
            LOOPS[loop](our_ddp, our_optimizer, inputs, targets, tools)
        except RuntimeError as error:
            result.update(error=str(error), step=step, plain=plain_before, ours=ours_before,
                          after=[p.detach().clone() for p in ours.parameters()])
            break
    else:
        result.update(plain=[p.detach() for p in plain.parameters()], ours=[p.detach() for p in ours.parameters()])
    torch.save(result, f"{out}/rank{rank}.pt")


def _assert_same_weights(ours: list[torch.Tensor], plain: list[torch.Tensor]) -> None:
    for mine, theirs in zip(ours, plain):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())


@pytest.mark.slow
@requires_gloo
@pytest.mark.parametrize("loop, method", [("accumulated", "galore"), ("accumulated_no_sync", "galore-random")])
def test_accumulation_trains_ddp_weights(tmp_path, loop, method):
    """Every micro-batch communicating, re-projecting the lift through an orthonormal basis; or
    only the last one (no_sync), whatever the basis: plain DDP's weights."""
    run_ranks(_loop_worker, str(tmp_path), loop, method)
    rank0 = torch.load(tmp_path / "rank0.pt")
    assert rank0["error"] is None
    _assert_same_weights(rank0["ours"], rank0["plain"])


@pytest.mark.slow
@requires_gloo
@pytest.mark.parametrize("loop, method, names", [
    ("accumulated", "galore-random", "no_sync"),  # a Gaussian sketch: Pᵀ(P R₁ + G₂) ≠ R₁ + PᵀG₂
    ("scaled", "galore", "GradScaler"),
    ("clipped", "galore", "clip_grad_norm_"),
    ("clipped_in_closure", "galore", "clip_grad_norm_"),
])
def test_a_step_that_would_read_a_stale_projection_is_refused_before_any_update(tmp_path, loop, method, names):
    """Plain DDP's weights up to the first step that reads the averaged R (step 1: step 0
    refreshes, its full gradients are exact), which raises on both ranks, naming the fix, and
    leaves every weight as it was."""
    run_ranks(_loop_worker, str(tmp_path), loop, method)
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["error"] is not None and names in result["error"] and result["step"] == 1, result["error"]
        _assert_same_weights(result["ours"], result["plain"])
        for before, after in zip(result["ours"], result["after"]):
            assert torch.equal(before, after)
