"""Staggered refreshes (``schedule_args: {stagger: true}``, fixed and lazy schedules): weight i of
the optimizer's N low-rank weights refreshes at its first step, then T + ⌊i·T/N⌋ steps later and
every T steps from there — at most ⌈N/T⌉ weights per step after the first — in standard and
layer-wise mode, on every DDP rank, and bitwise through a resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from lit_lowrank import LowRankOptimizer, testing
from lit_lowrank.optim.layerwise import LayerwiseUpdates
from lit_lowrank.schedules.fixed import FixedGap
from lit_lowrank.schedules.lazy import LazyGap
from ranks import requires_gloo, run_ranks

WIDTH, RANK = 6, 2
NO_GROWTH = {"threshold": 2.0}  # |cos| never reaches 2: the lazy gap stays T, so the cadence is comparable


class Stack(nn.Module):
    """``layers`` tanh-linear layers of width 6 with biases (dense), seeded."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(layers))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            inputs = torch.tanh(layer(inputs))
        return inputs

    def weights(self) -> list[nn.Parameter]:
        return [layer.weight for layer in self.layers]


def optimizer_for(model: Stack, gap: int, schedule: str = "fixed", stagger: bool = True) -> LowRankOptimizer:
    """The weights in two low-rank groups with the (dense) biases between them: the phases count
    the low-rank weights across groups, in group order."""
    weights, half = model.weights(), len(model.layers) // 2
    args = {"stagger": stagger, **(NO_GROWTH if schedule == "lazy" else {})}
    low = {"lowrank": True, "schedule": schedule, "schedule_args": args}
    return LowRankOptimizer([{"params": weights[:half], **low},
                             {"params": [layer.bias for layer in model.layers]},
                             {"params": weights[half:], **low, "lr": 5e-3}],
                            lr=1e-2, rank=RANK, update_gap=gap)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(4, WIDTH, generator=generator), torch.randn(4, WIDTH, generator=generator)


def loss_at(model: Stack, step: int) -> torch.Tensor:
    inputs, targets = batch(step)
    return nn.functional.mse_loss(model(inputs), targets)


def refreshes_of(optimizer: LowRankOptimizer, weights: list[nn.Parameter]) -> list[int]:
    projectors = optimizer.projectors
    return [projectors[w].refreshes if w in projectors else 0 for w in weights]


def train(model: Stack, optimizer: LowRankOptimizer, steps: range, layerwise: bool = False) -> list[list[int]]:
    """Train ``steps``; for each step, the indices of the weights whose subspace it refreshed."""
    if layerwise:
        LayerwiseUpdates(optimizer).attach()
    refreshed = []
    for step in steps:
        before = refreshes_of(optimizer, model.weights())
        optimizer.zero_grad()
        loss_at(model, step).backward()
        optimizer.step()  # a no-op in layer-wise mode: backward stepped each weight
        after = refreshes_of(optimizer, model.weights())
        refreshed.append([i for i, (a, b) in enumerate(zip(before, after)) if b > a])
    return refreshed


def expected_refreshes(count: int, gap: int, steps: int) -> list[list[int]]:
    """The staggered schedule written out: weight i refreshes at 0, then T + ⌊i·T/N⌋ + kT."""
    by_step = [[] for _ in range(steps)]
    for i in range(count):
        phase = math.floor(i * gap / count)
        for step in [0, *range(gap + phase, steps, gap)]:
            by_step[step].append(i)
    return by_step


@pytest.mark.parametrize("schedule", ["fixed", "lazy"])
@pytest.mark.parametrize("count, gap", [(6, 4), (3, 5), (8, 8), (7, 3)])
def test_refreshes_are_spread_over_the_gap(schedule, count, gap):
    model = Stack(count)
    steps = 3 * gap
    refreshed = train(model, optimizer_for(model, gap, schedule), range(steps))
    assert refreshed == expected_refreshes(count, gap, steps)
    assert refreshed[0] == list(range(count))  # every weight needs a basis at its first step
    assert max(len(weights) for weights in refreshed[1:]) <= math.ceil(count / gap)
    for i in range(count):
        steps_of_i = [step for step, weights in enumerate(refreshed) if i in weights]
        assert all(b - a == gap for a, b in zip(steps_of_i[1:], steps_of_i[2:]))  # every T steps exactly
        assert gap <= steps_of_i[1] - steps_of_i[0] < 2 * gap  # the first basis serves T + φ_i steps
    plain = Stack(count)
    unstaggered = train(plain, optimizer_for(plain, gap, schedule, stagger=False), range(steps))
    assert sum(map(len, refreshed)) <= sum(map(len, unstaggered))  # never more SVDs


@pytest.mark.parametrize("schedule", ["fixed", "lazy"])
def test_a_resume_mid_cycle_trains_bitwise_as_an_uninterrupted_run(schedule):
    count, gap, steps, saved_at = 6, 4, 14, 5  # saved after step 5: weights 0-2 refreshed at 4-5, the rest pending
    straight = Stack(count)
    straight_optimizer = optimizer_for(straight, gap, schedule)
    first_part = train(straight, straight_optimizer, range(saved_at + 1))
    buffer = io.BytesIO()
    torch.save({"model": straight.state_dict(), "optimizer": straight_optimizer.state_dict()}, buffer)
    rest = train(straight, straight_optimizer, range(saved_at + 1, steps))

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = Stack(count)
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = optimizer_for(resumed, gap, schedule)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    assert train(resumed, resumed_optimizer, range(saved_at + 1, steps)) == rest
    assert first_part + rest == expected_refreshes(count, gap, steps)
    for ours, theirs in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(ours, theirs)


def test_the_phases_are_saved_and_outlive_another_count_of_weights():
    """A checkpoint's phase is restored even where this run's position would give another."""
    schedule = FixedGap(gap=10, stagger=True)
    schedule.set_position(3, 4)  # φ = ⌊3·10/4⌋ = 7
    state = schedule.state_dict()
    assert (int(state["phase"]), bool(state["phase_due"])) == (7, True)
    resumed = FixedGap(gap=10, stagger=True)
    resumed.set_position(1, 4)  # φ would be 2
    resumed.load_state_dict(state)
    resumed.after_refresh(0, None)
    assert resumed.next_refresh == 10 + 7
    resumed.after_refresh(17, 0.9)
    assert resumed.next_refresh == 27


def test_stagger_turned_on_at_a_resume_phases_the_next_refresh_and_off_drops_the_phase():
    unstaggered = FixedGap(gap=10)
    unstaggered.after_refresh(0, None)  # next at 10, no phase in its state
    assert set(unstaggered.state_dict()) == {"next_refresh"}
    turned_on = FixedGap(gap=10, stagger=True)
    turned_on.set_position(1, 2)  # φ = 5
    turned_on.load_state_dict(unstaggered.state_dict())
    assert turned_on.next_refresh == 10
    turned_on.after_refresh(10, 0.9)
    assert turned_on.next_refresh == 10 + 10 + 5

    staggered = FixedGap(gap=10, stagger=True)
    staggered.set_position(1, 2)
    turned_off = FixedGap(gap=10)
    turned_off.load_state_dict(staggered.state_dict())
    turned_off.after_refresh(0, None)
    assert turned_off.next_refresh == 10


@pytest.mark.parametrize("schedule", ["fixed", "lazy"])
def test_layerwise_mode_refreshes_at_the_same_steps(schedule):
    count, gap = 6, 4
    standard, layerwise = Stack(count), Stack(count)
    expected = train(standard, optimizer_for(standard, gap, schedule), range(3 * gap))
    assert train(layerwise, optimizer_for(layerwise, gap, schedule), range(3 * gap), layerwise=True) == expected
    assert expected == expected_refreshes(count, gap, 3 * gap)


@pytest.mark.parametrize("value", [1, "true", None])
def test_stagger_must_be_a_bool_and_is_checked_when_the_optimizer_is_built(value):
    model = Stack(2)
    for schedule in ("fixed", "lazy"):
        with pytest.raises(TypeError, match=r"schedule '.*stagger must be true or false, got .*check schedule_args"):
            LowRankOptimizer([{"params": model.weights(), "lowrank": True, "schedule": schedule,
                               "schedule_args": {"stagger": value}}], rank=RANK)


def test_every_step_takes_no_stagger():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['stagger'\]"):
        LowRankOptimizer([{"params": Stack(2).weights(), "lowrank": True, "schedule": "every-step",
                           "schedule_args": {"stagger": True}}], rank=RANK)


@pytest.mark.parametrize("cls", [FixedGap, LazyGap])
def test_staggered_schedules_pass_the_conformance_kit(cls):
    testing.check_schedule(cls, stagger=True)


def _ddp_worker(rank: int, world_size: int, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from lit_lowrank.optim.communication import LowRankCommunication, lowrank_comm_hook

    model = Stack(6)
    optimizer = optimizer_for(model, 4)
    ddp = DistributedDataParallel(model)
    ddp.register_comm_hook(LowRankCommunication(optimizer), lowrank_comm_hook)
    refreshed = []
    for step in range(12):
        before = refreshes_of(optimizer, model.weights())
        optimizer.zero_grad()
        inputs, targets = (part[rank::world_size] for part in batch(step))
        nn.functional.mse_loss(ddp(inputs), targets).backward()
        optimizer.step()
        refreshed.append([i for i, (a, b) in enumerate(zip(before, refreshes_of(optimizer, model.weights()))) if b > a])
    torch.save({"refreshed": refreshed, "params": [p.detach() for p in model.parameters()]}, f"{out}/rank{rank}.pt")


@pytest.mark.slow
@requires_gloo
def test_every_ddp_rank_refreshes_the_same_weights_at_the_same_steps(tmp_path):
    run_ranks(_ddp_worker, str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0["refreshed"] == rank1["refreshed"] == expected_refreshes(6, 4, 12)
    for a, b in zip(rank0["params"], rank1["params"]):
        assert torch.equal(a, b)

