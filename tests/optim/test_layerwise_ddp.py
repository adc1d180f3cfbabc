"""Layer-wise updates under data parallel (gloo, 2 CPU processes): the hooks all-reduce ``R``
(or ``G``) themselves and step inside backward; the weights equal standard DDP's, with and
without gradient accumulation, and both ranks hold the same weights."""

from __future__ import annotations

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from lit_lowrank import build_optimizer
from lit_lowrank.optim.communication import sync_module_states
from lit_lowrank.optim.layerwise import LayerwiseUpdates
from ranks import requires_gloo, run_ranks
from test_layerwise import RANK, batches, small_llama

STEPS = 4  # update_gap 2: refreshes at steps 1 and 3
OPTIONS = dict(rank=RANK, update_gap=2, lr=1e-2, weight_decay=0.1)


def _windows(rank: int, world_size: int, accumulation: int) -> list[list[torch.Tensor]]:
    tokens = [t[rank::world_size] for t in batches(STEPS * accumulation)]  # each rank: one row of each batch
    return [tokens[i:i + accumulation] for i in range(0, len(tokens), accumulation)]


def _standard_ddp(rank, world_size, accumulation, rule):
    model = small_llama(torch.float64)
    ddp, optimizer = DistributedDataParallel(model), build_optimizer(model, **OPTIONS, rule=rule)
    for window in _windows(rank, world_size, accumulation):
        for i, tokens in enumerate(window):
            last = i == len(window) - 1
            with (ddp.no_sync() if not last else torch.enable_grad()):
                (ddp(tokens, labels=tokens).loss / accumulation).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def _layerwise(rank, world_size, accumulation, communication, rule):
    torch.manual_seed(rank)  # different initial weights on each rank: sync_module_states makes them rank 0's
    model = small_llama(torch.float64) if rank == 0 else small_llama(torch.float64).apply(_perturbed)
    sync_module_states(model)
    optimizer = build_optimizer(model, **OPTIONS, rule=rule)
    updates = LayerwiseUpdates(optimizer, accumulation, communication=communication).attach()
    sent = []
    for window in _windows(rank, world_size, accumulation):
        refreshes = optimizer.refresh_count
        for tokens in window:
            (model(tokens, labels=tokens).loss / accumulation).backward()
        optimizer.step()  # a no-op
        sent.append((optimizer.comm_bytes, optimizer.refresh_count > refreshes))
    assert all(p.grad is None for p in model.parameters()) and updates.accumulator_bytes() == {"low_rank": 0, "full": 0}
    return model, optimizer, sent


def _perturbed(module: torch.nn.Module) -> None:
    for p in module.parameters(recurse=False):
        p.data.add_(1.0)


def _worker(rank: int, world_size: int, out: str, accumulation: int, communication: str, rule: str) -> None:
    standard = _standard_ddp(rank, world_size, accumulation, rule)
    model, optimizer, sent = _layerwise(rank, world_size, accumulation, communication, rule)
    targets = [p for group in optimizer.param_groups if group["lowrank"] for p in group["params"]]
    torch.save({"standard": [p.detach() for p in standard.parameters()],
                "layerwise": [p.detach() for p in model.parameters()], "sent": sent,
                "low_rank_bytes": sum(RANK * max(p.shape) * 8 for p in targets),
                "dense_bytes": sum(p.numel() * 8 for p in model.parameters()) - sum(p.numel() * 8 for p in targets),
                "all_bytes": sum(p.numel() * 8 for p in model.parameters())}, f"{out}/rank{rank}.pt")


@requires_gloo
@pytest.mark.parametrize("accumulation, communication, rule", [
    (1, "lowrank", "galore"), (2, "lowrank", "galore"), (2, "full", "galore"),
    (2, "lowrank", "fira"),  # reads G: its full gradient is reduced
])
def test_layerwise_ddp_equals_standard_ddp(tmp_path, accumulation, communication, rule):
    run_ranks(_worker, str(tmp_path), accumulation, communication, rule)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for a, b in zip(rank0["layerwise"], rank1["layerwise"]):
        assert torch.equal(a, b)
    for ours, standard in zip(rank0["layerwise"], rank0["standard"]):
        torch.testing.assert_close(ours, standard, rtol=1e-9, atol=1e-9)
    for sent, refreshed in rank0["sent"]:
        if refreshed or communication == "full" or rule == "fira":
            assert sent == rank0["all_bytes"]
        else:  # R = PᵀG of every target weight, r·max(m, n) numbers; dense weights in full
            assert sent == rank0["low_rank_bytes"] + rank0["dense_bytes"]


SHAPE = dict(hidden=256, layers=2, vocab=1024)  # gradients outweigh activations (test_layerwise's peak test)
PEAK_OPTIONS = dict(rank=32, update_gap=200, lr=1e-3)


def _peak(script, layerwise_args: dict | None = None) -> int:
    tokens = torch.randint(0, SHAPE["vocab"], (1, 16), generator=torch.Generator().manual_seed(0))
    return script.backward_peak_bytes(script.small_llama(*SHAPE.values()), tokens, layerwise=True,
                                      layerwise_args=layerwise_args, **PEAK_OPTIONS)


SYNCHRONOUS = 1e-6  # bucket_cap_mb below every payload: each all-reduce is waited for in its own hook


def _peak_worker(rank: int, world_size: int, out: str) -> None:
    from test_layerwise import _script

    peaks = {cap: _peak(_script(), {"bucket_cap_mb": cap}) for cap in (SYNCHRONOUS, 1, 25)}
    torch.save(peaks, f"{out}/peak{rank}.pt")


@requires_gloo
def test_layerwise_ddp_backward_peak_is_single_process_plus_what_is_in_flight(tmp_path):
    """Allocator-measured (scripts/measure_layerwise_memory.py): under data parallel the backward
    peak is the single-process layer-wise peak plus at most ``bucket_cap_mb`` of payloads in
    flight, on each rank; with nothing left in flight it is the single-process peak."""
    from test_layerwise import _script

    single = _peak(_script())
    run_ranks(_peak_worker, str(tmp_path))
    for rank in (0, 1):
        peaks = torch.load(tmp_path / f"peak{rank}.pt")
        for cap, peak in peaks.items():
            assert peak <= single + cap * 2**20, (rank, cap, peak, single)
        assert peaks[SYNCHRONOUS] <= 1.02 * single, (rank, peaks, single)


LEFT_PASSES = 8


def _left_worker(rank: int, world_size: int, out: str) -> None:
    """What the profiler saw allocated and not freed in each of several layer-wise backward passes."""
    from torch.profiler import ProfilerActivity, profile

    from test_layerwise import _script

    script = _script()
    model = script.small_llama(*SHAPE.values())
    LayerwiseUpdates(build_optimizer(model, **PEAK_OPTIONS), bucket_cap_mb=1).attach()
    tokens = torch.randint(0, SHAPE["vocab"], (1, 16), generator=torch.Generator().manual_seed(0))
    model(tokens, labels=tokens).loss.backward()  # the first step allocates the optimizer state
    left = []
    for _ in range(LEFT_PASSES):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model(tokens, labels=tokens).loss.backward()
        left.append(script.cpu_left(prof))
    torch.save(left, f"{out}/left{rank}.pt")


@requires_gloo
def test_layerwise_ddp_payloads_are_freed_when_their_parameter_is_stepped(tmp_path):
    """Each all-reduced payload (``R`` or a gradient) is freed on the thread that steps its
    parameter, right after the step: the process group's worker, which still references a
    completed all-reduce's tensors, never frees one later on its own thread (past the
    ``bucket_cap_mb`` accounting, unseen by the profiler). So every byte a backward pass took
    is seen returned by its end, in every pass, on every rank."""
    run_ranks(_left_worker, str(tmp_path))
    for rank in (0, 1):
        assert torch.load(tmp_path / f"left{rank}.pt") == [0] * LEFT_PASSES, rank


class Branches(torch.nn.Module):
    """``attn`` → ``mlp``, plus ``extra`` added to the output when ``use_extra``: a parameter
    whose use depends on the batch (as an expert does on the routing)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn, self.mlp, self.extra = torch.nn.Linear(12, 16), torch.nn.Linear(16, 4), torch.nn.Linear(12, 4)

    def forward(self, x: torch.Tensor, use_extra: bool) -> torch.Tensor:
        out = self.mlp(torch.tanh(self.attn(x)))
        return out + self.extra(x) if use_extra else out


EXTRA_USED_ON = [(0, 1), (), (0,)]  # by step: the ranks whose batch uses `extra`


def _unused_worker(rank: int, world_size: int, out: str, accumulation: int) -> None:
    model = Branches()
    optimizer = build_optimizer(model, targets=["attn", "mlp", "extra"], rank=2, update_gap=2, lr=1e-2)
    LayerwiseUpdates(optimizer, accumulation).attach()
    generator = torch.Generator().manual_seed(rank)
    result = {"error": None}
    for step, used_on in enumerate(EXTRA_USED_ON):
        before = [p.detach().clone() for p in model.parameters()]
        try:
            for micro_batch in range(accumulation):  # `extra` used in the window's first micro-batch only
                use_extra = rank in used_on and micro_batch == 0
                model(torch.randn(4, 12, generator=generator), use_extra).square().mean().backward()
        except RuntimeError as error:
            result.update(error=str(error), step=step,
                          unchanged=all(torch.equal(a, b) for a, b in zip(before, model.parameters())))
            break
    torch.save(result, f"{out}/rank{rank}.pt")


@pytest.mark.slow
@requires_gloo
@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_parameter_unused_on_one_rank_is_named_on_every_rank_before_any_update(tmp_path, accumulation):
    """``extra`` is used on both ranks (step 0), on none (step 1: skipped everywhere, no error),
    then on rank 0 only (step 2): both ranks raise, naming its weight and bias, before any
    all-reduce of that step could pair different parameters, and no weight changes in it."""
    run_ranks(_unused_worker, str(tmp_path), accumulation)
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["error"] is not None and result["step"] == 2, result["error"]
        assert "extra.weight" in result["error"] and "extra.bias" in result["error"]
        assert "attn" not in result["error"] and "mlp" not in result["error"]
        assert ("has one on this rank" if rank == 0 else "none on this rank") in result["error"]
        assert result["unchanged"]
