"""Refresh work shared across ranks (gloo, 2 CPU processes): each rank computes only its share of
the subspace refreshes and receives the others' projector states, and the trained weights are
bitwise those of every rank refreshing every weight — under plain DDP (``refresh_sharing: on``)
and FSDP2 (``auto``), with warm-started, staggered and lazy refreshes, and a failed refresh is
raised on every rank with every projector rolled back."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lit_lowrank import build_optimizer
from lit_lowrank.optim.refresh_sharing import owners
from lit_lowrank.projectors.base import Projector
from ranks import requires_gloo, run_ranks

STEPS = 6
OPTIONS = dict(targets=["layers"], rank=3, update_gap=2, lr=1e-2, scale=1.0)
VARIANTS = {  # name → options on top of OPTIONS
    "svd": {},
    "svd-warm": dict(method="galore-warm"),
    "stagger": dict(schedule_args={"stagger": True}),
    "lazy-rotate": dict(schedule="lazy", on_refresh="rotate"),
}


class Stack(nn.Module):
    """Four target weights of different costs m·n (240, 224, 168, 64): two rank shares."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        sizes = [12, 20, 14, 12, 4]
        self.layers = nn.ModuleList(nn.Linear(a, b, dtype=torch.float64) for a, b in zip(sizes, sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))
        return self.layers[-1](x)


def batches(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 12, generator=generator, dtype=torch.float64),
             torch.randn(8, 4, generator=generator, dtype=torch.float64)) for _ in range(steps)]


def train(model: nn.Module, optimizer, rank: int, world_size: int) -> list[int | None]:
    """Train on this rank's share of each batch; the bytes each step exchanged (FSDP)."""
    sent = []
    for inputs, targets in batches():
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs[rank::world_size]), targets[rank::world_size]).backward()
        optimizer.step()
        sent.append(optimizer.comm_bytes)
    return sent


class RefreshCounter:
    """Counts ``Projector.refresh`` calls in this process (every built-in projector's entry)."""

    def __init__(self) -> None:
        self.calls, self.original = 0, Projector.refresh

    def __enter__(self) -> RefreshCounter:
        counter = self

        def counted(projector: Projector, grad: torch.Tensor) -> None:
            counter.calls += 1
            counter.original(projector, grad)

        Projector.refresh = counted
        return self

    def __exit__(self, *exc: object) -> None:
        Projector.refresh = self.original


def trained(model: nn.Module, options: dict, rank: int, world_size: int, wrap,
            ) -> tuple[list[torch.Tensor], int, int, list[int | None]]:
    """The weights after training, this rank's refresh calls, the optimizer's refresh count, and
    the bytes each step exchanged."""
    optimizer = build_optimizer(model, **options)
    with RefreshCounter() as counter:
        sent = train(wrap(model), optimizer, rank, world_size)
    weights = [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in model.parameters()]
    return weights, counter.calls, optimizer.refresh_count, sent


def _ddp_worker(rank: int, world_size: int, out: str) -> None:
    results = {}
    for name, variant in VARIANTS.items():
        for sharing in ("on", "off"):
            results[name, sharing] = trained(Stack(), {**OPTIONS, **variant, "refresh_sharing": sharing}, rank,
                                             world_size, DistributedDataParallel)
    torch.save(results, f"{out}/rank{rank}.pt")


def _fsdp_worker(rank: int, world_size: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    def sharded() -> Stack:
        model = Stack()
        for layer in model.layers:
            fully_shard(layer)
        return fully_shard(model)

    results = {}
    for name, variant in VARIANTS.items():
        for sharing in ("auto", "off"):
            results[name, sharing] = trained(sharded(), {**OPTIONS, **variant, "refresh_sharing": sharing}, rank,
                                             world_size, lambda model: model)
    torch.save(results, f"{out}/rank{rank}.pt")


def check_shared(results: list[dict], shared: str) -> None:
    """Sharing on: bitwise the weights of sharing off, on both ranks; together the ranks made each
    refresh once, and each made part of them."""
    for name in VARIANTS:
        (weights_on, calls_0, count, _), (_, calls_1, _, _) = (r[name, shared] for r in results)
        weights_off, every, count_off, _ = results[0][name, "off"]
        assert count == count_off > 0, name
        assert every == count_off, name  # off: every rank refreshes every weight
        assert calls_0 + calls_1 == every and 0 < calls_0 < every and 0 < calls_1 < every, (name, calls_0, calls_1)
        for rank_result in results:
            for ours, reference in zip(rank_result[name, shared][0], weights_off):
                assert torch.equal(ours, reference), name


@requires_gloo
@pytest.mark.slow
def test_ddp_shared_refreshes_train_bitwise_the_same_weights(tmp_path):
    run_ranks(_ddp_worker, str(tmp_path))
    check_shared([torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)], "on")


@requires_gloo
@pytest.mark.slow
def test_fsdp_shared_refreshes_train_bitwise_the_same_weights(tmp_path):
    run_ranks(_fsdp_worker, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    check_shared(results, "auto")
    # the first step refreshes every weight: a gather of each G to its owner, not an all-gather to both
    for result in results:
        assert result["svd", "auto"][3][0] < result["svd", "off"][3][0]


def _auto_worker(rank: int, world_size: int, out: str) -> None:
    """Plain DDP with ``auto``: the optimizer cannot know the gradients were averaged, so every
    rank refreshes every weight; told so (``gradients_identical``), it shares."""
    calls = {}
    for told in (False, True):
        model = Stack()
        optimizer = build_optimizer(model, **OPTIONS)
        optimizer.gradients_identical = told
        with RefreshCounter() as counter:
            train(DistributedDataParallel(model), optimizer, rank, world_size)
        calls[told] = (counter.calls, optimizer.refresh_count)
    torch.save(calls, f"{out}/rank{rank}.pt")


@requires_gloo
@pytest.mark.slow
def test_auto_shares_only_gradients_known_to_be_identical(tmp_path):
    run_ranks(_auto_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for calls in ranks:
        assert calls[False][0] == calls[False][1]
    assert ranks[0][True][0] + ranks[1][True][0] == ranks[0][True][1]
    assert ranks[0][True][0] < ranks[0][True][1]


def _failure_worker(rank: int, world_size: int, out: str) -> None:
    """The refresh of step 2 fails on rank 1 only (its own weights): both ranks raise its error,
    and every projector is as before the step on both."""
    model = Stack()
    optimizer = build_optimizer(model, **OPTIONS, refresh_sharing="on")
    ddp = DistributedDataParallel(model)
    data = batches()
    for inputs, targets in data[:2]:
        optimizer.zero_grad()
        nn.functional.mse_loss(ddp(inputs[rank::2]), targets[rank::2]).backward()
        optimizer.step()
    before = [{k: v.clone() for k, v in projector.state_dict().items()} for projector in optimizer.projectors.values()]
    inputs, targets = data[2]
    optimizer.zero_grad()
    nn.functional.mse_loss(ddp(inputs[rank::2]), targets[rank::2]).backward()
    original = Projector.refresh

    def failing(projector: Projector, grad: torch.Tensor) -> None:
        if rank == 1:
            raise RuntimeError("SVD did not converge on rank 1")
        original(projector, grad)

    Projector.refresh = failing
    try:
        optimizer.step()
        message = None
    except RuntimeError as error:
        message = str(error)
    finally:
        Projector.refresh = original
    after = [projector.state_dict() for projector in optimizer.projectors.values()]
    unchanged = all(torch.equal(a[k], b[k]) for a, b in zip(before, after) for k in a)
    torch.save({"message": message, "unchanged": unchanged, "refreshes": optimizer.refresh_count}, f"{out}/rank{rank}.pt")


@requires_gloo
@pytest.mark.slow
def test_a_refresh_failing_on_its_owner_is_raised_on_every_rank_and_rolled_back(tmp_path):
    run_ranks(_failure_worker, str(tmp_path))
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["message"] == "SVD did not converge on rank 1"
        assert result["unchanged"]


def test_owners_balance_the_cost_largest_first():
    # by hand: 4 → rank 0; 3 → rank 1; 2 → rank 1 (3 < 4); 1 → rank 0 (4 < 5)
    assert owners([1, 4, 2, 3], 2) == [0, 0, 1, 1]
    costs = [240, 224, 168, 64, 64, 30]
    assigned = owners(costs, 3)
    loads = [sum(c for c, r in zip(costs, assigned) if r == rank) for rank in range(3)]
    assert max(loads) - min(loads) <= max(costs)
    assert owners(costs, 1) == [0] * len(costs)


def test_an_unknown_refresh_sharing_is_refused_when_built():
    with pytest.raises(ValueError, match=r"refresh_sharing='yes'; expected one of \('auto', 'on', 'off'\)"):
        build_optimizer(Stack(), **OPTIONS, refresh_sharing="yes")


def test_a_single_process_ignores_refresh_sharing():
    weights = {}
    for sharing in ("on", "off"):
        model = Stack()
        optimizer = build_optimizer(model, **OPTIONS, refresh_sharing=sharing)
        train(model, optimizer, 0, 1)
        weights[sharing] = [p.detach() for p in model.parameters()]
    for on, off in zip(weights["on"], weights["off"]):
        assert torch.equal(on, off)


def test_the_low_rank_communication_hook_marks_the_gradients_identical_over_the_world_only():
    from lit_lowrank.optim.communication import LowRankCommunication

    world, subgroup = (build_optimizer(Stack(), **OPTIONS) for _ in range(2))
    assert not world.gradients_identical
    LowRankCommunication(world)
    LowRankCommunication(subgroup, process_group="a subgroup")  # averaged over some ranks only
    assert world.gradients_identical and not subgroup.gradients_identical
