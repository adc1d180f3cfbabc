"""Q-GaLore's lazy schedule on scripted similarity sequences, in the optimizer, and through a
state-dict round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_lowrank import LowRankOptimizer, get_schedule
from lit_lowrank.schedules.lazy import LazyGap


def drive(schedule: LazyGap, similarities: list[float | None]) -> list[int]:
    """Refresh whenever the schedule asks, feeding the scripted similarities; the refresh steps."""
    steps, step = [], 0
    for similarity in similarities:
        while not schedule.should_refresh(step):
            step += 1
        steps.append(step)
        schedule.after_refresh(step, similarity)
    return steps


def reference_gaps(similarities, gap, threshold, gamma, k, reset):
    """The rule written out: queue of the last k, grow when full and mean >= threshold."""
    queue, gaps = [], []
    for similarity in similarities:
        if similarity is not None:
            queue = (queue + [similarity])[-k:]
            if len(queue) == k and sum(queue) / k >= threshold:
                gap = int(gap * gamma)
                if reset:
                    queue = []
        gaps.append(gap)
    return gaps


@pytest.mark.parametrize("reset", [True, False])
def test_gap_growth_follows_the_rule(reset):
    similarities = [None, 0.9, 0.8, 0.1, 0.2, 0.95, 0.9, 0.9, 0.99, 0.97, 0.5, 0.45, 0.3, 0.2, 0.1, 0.9]
    schedule = LazyGap(gap=10, threshold=0.4, gamma=2, queue_size=5, reset_queue=reset)
    gaps = []
    for similarity in similarities:
        schedule.after_refresh(0, similarity)
        gaps.append(schedule.gap)
    assert gaps == reference_gaps(similarities, 10, 0.4, 2, 5, reset)
    assert schedule.refreshes == len(similarities)
    # spot-check by hand: the window (0.9, 0.8, 0.1, 0.2, 0.95) has mean 0.59 ≥ 0.4 → 20 at the 6th
    assert gaps[4] == 10 and gaps[5] == 20


def test_refresh_steps_follow_the_growing_gap():
    schedule = LazyGap(gap=10, threshold=0.5, gamma=2, queue_size=2)
    steps = drive(schedule, [None, 0.9, 0.9, 0.9, 0.9, 0.1, 0.1])
    # gap 10, 10, grows to 20 after 2 similar refreshes, queue reset, grows to 40 after 2 more
    assert steps == [0, 10, 20, 40, 60, 100, 140]
    assert schedule.growths == 2


def test_dissimilar_subspaces_keep_the_gap():
    schedule = LazyGap(gap=7)
    steps = drive(schedule, [None] + [0.1] * 8)
    assert steps == [7 * i for i in range(9)] and schedule.gap == 7


def test_state_dict_is_tensors_and_round_trips():
    schedule = LazyGap(gap=10, queue_size=3)
    drive(schedule, [None, 0.9, 0.2])
    state = schedule.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    restored = LazyGap(gap=10, queue_size=3)
    restored.load_state_dict(state)
    for similarity in (0.9, 0.9, 0.1):
        schedule.after_refresh(50, similarity)
        restored.after_refresh(50, similarity)
        assert (restored.gap, restored.queue, restored.next_refresh) == (schedule.gap, schedule.queue,
                                                                         schedule.next_refresh)


def test_optimizer_reports_sign_invariant_similarity_and_counts_svds():
    """A gradient with a fixed rank-1 direction (whose sign flips) settles at once: the lazy
    layer takes fewer SVDs than the fixed-gap one."""
    torch.manual_seed(0)
    u, v = torch.randn(16, 1), torch.randn(1, 12)
    weights = [nn.Parameter(torch.zeros(16, 12)) for _ in range(2)]
    lazy = LowRankOptimizer([{"params": [weights[0]], "lowrank": True, "schedule": "lazy",
                              "schedule_args": {"queue_size": 2}}], rank=2, update_gap=5)
    fixed = LowRankOptimizer([{"params": [weights[1]], "lowrank": True}], rank=2, update_gap=5)
    for t in range(60):
        grad = (-1) ** t * (u @ v) + 0.01 * torch.randn(16, 12)
        for weight, optimizer in zip(weights, (lazy, fixed)):
            weight.grad = grad.clone()
            optimizer.step()
    schedule = lazy._slots[weights[0]].schedule
    assert min(schedule.queue or [1.0]) > 0.99  # |cos|, although the SVD sign flips every step
    assert fixed.refresh_count == 12
    assert schedule.refreshes == lazy.refresh_count == 6  # steps 0, 5, 10 | gap 10: 20, 30 | gap 20: 50
    assert schedule.gap == 20


def test_registered():
    assert get_schedule("lazy") is LazyGap
    with pytest.raises(ValueError, match="queue_size"):
        LazyGap(queue_size=0)


def _refresh_steps(optimizer, weight, grad, steps):
    """The steps (0-based update counts) at which ``optimizer`` refreshed ``weight``'s subspace."""
    refreshed = []
    for _ in range(steps):
        step = int(optimizer.state[weight]["step"]) if weight in optimizer.state else 0
        before = optimizer.refresh_count
        weight.grad = grad.clone()
        optimizer.step()
        if optimizer.refresh_count > before:
            refreshed.append(step)
    return refreshed


@pytest.mark.parametrize("schedule", ["fixed", "lazy"])
def test_a_resume_with_another_update_gap_uses_it_after_the_scheduled_refresh(schedule):
    """Saved with update_gap 2, resumed with 3: the refresh the checkpoint scheduled stays, and the
    gaps after it are the new update_gap's — for the lazy schedule, 3 grown as many times as the
    saved gap was (here once, then once more at the first refresh after the resume)."""
    torch.manual_seed(0)
    grad = torch.randn(16, 1) @ torch.randn(1, 12)  # one fixed direction: every |cos| is 1
    args = {"schedule": schedule}
    if schedule == "lazy":
        args["schedule_args"] = {"queue_size": 2, "threshold": 0.5, "gamma": 2}
    weight = nn.Parameter(torch.zeros(16, 12))
    first = LowRankOptimizer([{"params": [weight], "lowrank": True, **args}], rank=2, update_gap=2)
    before = _refresh_steps(first, weight, grad, 9)  # steps 0..8
    resumed = LowRankOptimizer([{"params": [weight], "lowrank": True, **args}], rank=2, update_gap=3)
    with pytest.warns(UserWarning, match="update_gap: 2 -> 3"):
        resumed.load_state_dict(first.state_dict())
    loaded_gap = resumed._slots[weight].schedule.gap
    after = _refresh_steps(resumed, weight, grad, 30)  # steps 9..38
    if schedule == "fixed":
        assert before == [0, 2, 4, 6, 8] and loaded_gap == 3
        assert after == [10, 13, 16, 19, 22, 25, 28, 31, 34, 37]
    else:
        # gap 2: refreshes 0, 2, 4 (2 similar → gap 4, queue emptied), 8; 12 is scheduled
        assert before == [0, 2, 4, 8]
        assert loaded_gap == 3 * 2  # the saved growth, on the new update_gap
        # 12: the queue fills → gap 3·2² = 12; 24: one in the queue; 36: full → gap 24
        assert after == [12, 12 + 3 * 2 ** 2, 12 + 2 * 3 * 2 ** 2]
