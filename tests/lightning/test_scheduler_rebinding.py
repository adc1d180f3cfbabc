"""Every torch LR scheduler class keeps driving the optimizer that trains after the low-rank
conversion: the converted groups' learning rates follow, step by step, those of the user's
optimizer under the same scheduler left unconverted (its own reference run)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch import nn
from torch.optim import lr_scheduler as schedulers

from lit_lowrank.lightning import LowRankConfig
from lit_lowrank.lightning.optimizer_conversion import convert_optimizers

STEPS = 12

SCHEDULERS = {
    "LambdaLR": lambda o: schedulers.LambdaLR(o, lambda step: 1 / (1 + step)),
    "MultiplicativeLR": lambda o: schedulers.MultiplicativeLR(o, lambda step: 0.9),
    "StepLR": lambda o: schedulers.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: schedulers.MultiStepLR(o, milestones=[2, 5], gamma=0.5),
    "ConstantLR": lambda o: schedulers.ConstantLR(o, factor=0.5, total_iters=4),
    "LinearLR": lambda o: schedulers.LinearLR(o, start_factor=0.1, total_iters=5),
    "ExponentialLR": lambda o: schedulers.ExponentialLR(o, gamma=0.8),
    "SequentialLR": lambda o: schedulers.SequentialLR(
        o, [schedulers.LinearLR(o, start_factor=0.1, total_iters=3), schedulers.CosineAnnealingLR(o, T_max=8)],
        milestones=[3]),
    "PolynomialLR": lambda o: schedulers.PolynomialLR(o, total_iters=10, power=2.0),
    "CosineAnnealingLR": lambda o: schedulers.CosineAnnealingLR(o, T_max=6),
    "ChainedScheduler": lambda o: schedulers.ChainedScheduler(
        [schedulers.ConstantLR(o, factor=0.5, total_iters=4), schedulers.ExponentialLR(o, gamma=0.9)]),
    "ReduceLROnPlateau": lambda o: schedulers.ReduceLROnPlateau(o, patience=0, factor=0.5),
    "CyclicLR": lambda o: schedulers.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=3, cycle_momentum=False),
    "CosineAnnealingWarmRestarts": lambda o: schedulers.CosineAnnealingWarmRestarts(o, T_0=4),
    "OneCycleLR": lambda o: schedulers.OneCycleLR(o, max_lr=0.1, total_steps=STEPS + 1, cycle_momentum=False),
}


def test_every_torch_scheduler_class_is_covered():
    torch_classes = {name for name, cls in vars(schedulers).items()
                     if isinstance(cls, type) and issubclass(cls, schedulers.LRScheduler)
                     and not name.startswith("_") and name != "LRScheduler"}
    assert torch_classes <= set(SCHEDULERS)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(6, 6) for _ in range(2)])
        self.head = nn.Linear(6, 2)


def param_groups(net: Net, groups: int) -> list[dict]:
    """One group of everything, or two: block 0 and the head, block 1 (each mixes targets and
    dense params, so the conversion splits it)."""
    if groups == 1:
        return [{"params": list(net.parameters())}]
    return [{"params": [*net.blocks[0].parameters(), *net.head.parameters()], "lr": 0.05},
            {"params": list(net.blocks[1].parameters())}]


def step(optimizer: torch.optim.Optimizer, scheduler, metric: float) -> None:
    optimizer.step()
    if isinstance(scheduler, schedulers.ReduceLROnPlateau):
        scheduler.step(metric)
    else:
        scheduler.step()


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_converted_groups_follow_the_users_schedule(name, groups):
    net, reference_net = Net(), Net()
    reference_net.load_state_dict(net.state_dict())
    reference = torch.optim.SGD(param_groups(reference_net, groups), lr=0.1)
    reference_scheduler = SCHEDULERS[name](reference)
    optimizer = torch.optim.SGD(param_groups(net, groups), lr=0.1)
    scheduler_config = LRSchedulerConfig(SCHEDULERS[name](optimizer))
    config = LowRankConfig(rank=2, targets=["blocks"])
    [converted] = convert_optimizers(net, [optimizer], [scheduler_config], config)
    assert scheduler_config.scheduler.optimizer is converted
    position = {id(p): i for i, p in enumerate(net.parameters())}
    reference_params = list(reference_net.parameters())
    follows = [next(j for j, g in enumerate(reference.param_groups)
                    if any(q is reference_params[position[id(group["params"][0])]] for q in g["params"]))
               for group in converted.param_groups]
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    for t in range(STEPS):
        metric = float(t)  # never improves: ReduceLROnPlateau cuts the lr every step
        step(reference, reference_scheduler, metric)
        step(converted, scheduler_config.scheduler, metric)
        got = [group["lr"] for group in converted.param_groups]
        want = [reference.param_groups[j]["lr"] for j in follows]
        assert got == pytest.approx(want, rel=1e-12), f"step {t}"


class HalvingPerGroup(schedulers.LRScheduler):
    """A user's scheduler with a per-group list of its own."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.factors = [0.5] * len(optimizer.param_groups)
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [base * factor ** self.last_epoch for base, factor in zip(self.base_lrs, self.factors)]


def test_a_users_scheduler_with_an_unknown_per_group_list_is_refused_when_groups_split():
    net = Net()
    optimizer = torch.optim.SGD(param_groups(net, 2), lr=0.1)
    with pytest.raises(ValueError, match=r"HalvingPerGroup\.factors .* separate param groups"):
        convert_optimizers(net, [optimizer], [LRSchedulerConfig(HalvingPerGroup(optimizer))],
                           LowRankConfig(rank=2, targets=["blocks"]))


def test_a_users_scheduler_is_rebound_when_no_group_is_split():
    net = Net()
    groups = [{"params": [net.blocks[0].weight, net.blocks[1].weight]},
              {"params": [net.blocks[0].bias, net.blocks[1].bias, *net.head.parameters()], "lr": 0.05}]
    optimizer = torch.optim.SGD(groups, lr=0.1)
    scheduler = HalvingPerGroup(optimizer)
    [converted] = convert_optimizers(net, [optimizer], [LRSchedulerConfig(scheduler)],
                                     LowRankConfig(rank=2, targets=["blocks"]))
    converted.step()
    scheduler.step()
    assert [g["lr"] for g in converted.param_groups] == pytest.approx([0.05, 0.025])
