"""One adoption mechanism (:class:`~lit_lowrank.lightning.adoption.Adoption`): ``LowRankCallback``
and the ``lowrank``/``ddp_lowrank``/``fsdp_lowrank`` strategies run its phases through Lightning's
public hooks, and turn one user module (AdamW in two param groups, a LambdaLR) into the same
optimizer, groups and schedule; the callback leaves the strategy's methods alone."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_lowrank import LowRankOptimizer, shard_blocks
from lit_lowrank.lightning import DDPLowRankStrategy, FSDPLowRankStrategy, LowRankCallback, LowRankStrategy
from lit_lowrank.lightning.adoption import Adoption

LR, DECAY, HALVING = 1e-2, 0.5, 0.5
STEPS = 3
OPTIONS = dict(targets=["blocks"], rank=2, update_gap=2)

PATHS = {
    "callback": lambda: dict(callbacks=[LowRankCallback(**OPTIONS)]),
    "lowrank": lambda: dict(strategy=LowRankStrategy(**OPTIONS)),
    "ddp_lowrank": lambda: dict(strategy=DDPLowRankStrategy(**OPTIONS, ddp_kwargs={"process_group_backend": "gloo"})),
    "fsdp_lowrank": lambda: dict(strategy=FSDPLowRankStrategy(**OPTIONS, process_group_backend="gloo")),
}
"""Each way in, on one CPU process."""


class UserModule(pl.LightningModule):
    """A user's module: AdamW with the blocks decayed and the head not, halving its lr each step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
        self.head = nn.Linear(8, 2)

    def configure_model(self) -> None:
        if self.device_mesh is not None:  # fsdp_lowrank: the module shards itself, as Lightning requires
            for part in (self.blocks, self.head):
                shard_blocks(part, self.device_mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.blocks(x)), y)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW([{"params": self.blocks.parameters(), "weight_decay": DECAY},
                                       {"params": self.head.parameters(), "weight_decay": 0.0}], lr=LR)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: HALVING ** step)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def fit(path: str, steps: int = STEPS, callbacks: tuple = ()) -> pl.Trainer:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8 * steps, 8, generator=g), torch.randint(0, 2, (8 * steps,), generator=g))
    options = PATHS[path]()
    options["callbacks"] = [*callbacks, *options.get("callbacks", [])]
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, **options)
    trainer.fit(UserModule(), DataLoader(data, batch_size=8))
    return trainer


def groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Every option of every param group, the parameters by name."""
    return [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]


def state_layout(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Per parameter, in group order: each state entry's shape (its values depend on the order in
    which the strategy reduced the gradients)."""
    return [{key: tuple(getattr(value, "shape", ())) for key, value in optimizer.state[p].items()}
            for group in optimizer.param_groups for p in group["params"]]


@pytest.mark.slow
@pytest.mark.parametrize("path", list(PATHS))
def test_each_way_in_runs_the_phases_of_one_adoption_in_order(path, monkeypatch):
    phases = []
    for phase in ("prepare", "callbacks", "convert"):
        def record(self, *args, _phase=phase, _original=getattr(Adoption, phase), **kwargs):
            phases.append(_phase)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Adoption, phase, record)
    trainer = fit(path, steps=1)
    assert phases == ["prepare", "callbacks", "convert"]
    assert isinstance(trainer.optimizers[0], LowRankOptimizer)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["lowrank", "ddp_lowrank", "fsdp_lowrank"])
def test_the_callback_and_each_strategy_build_the_same_optimizer_groups_and_schedule(path):
    by_callback, by_strategy = fit("callback"), fit(path)
    [ours], [theirs] = by_callback.optimizers, by_strategy.optimizers
    assert groups(theirs) == groups(ours)
    expected_lr = LR * HALVING ** STEPS  # LambdaLR after STEPS steps, independent of the conversion
    assert [g["lr"] for g in ours.param_groups] == pytest.approx([expected_lr] * len(ours.param_groups))
    assert [g["name"] for g in ours.param_groups] == ["pg1", "pg1-dense", "pg2"]
    assert [g["weight_decay"] for g in ours.param_groups] == [DECAY, DECAY, 0.0]
    [callback_schedule], [strategy_schedule] = by_callback.lr_scheduler_configs, by_strategy.lr_scheduler_configs
    assert strategy_schedule.scheduler.optimizer is theirs and callback_schedule.scheduler.optimizer is ours
    assert strategy_schedule.scheduler.state_dict() == callback_schedule.scheduler.state_dict()
    assert strategy_schedule.name == callback_schedule.name == "lr-AdamW"
    assert type(theirs) is type(ours) and theirs.defaults == ours.defaults
    assert state_layout(theirs) == state_layout(ours)


class SeeOptimizersAtFitStart(pl.Callback):
    """Listed before LowRankCallback: what the other callbacks see in ``on_fit_start``."""

    def on_fit_start(self, trainer, pl_module):
        self.kinds = [type(o) for o in trainer.optimizers]
        self.patched = "setup_optimizers" in vars(trainer.strategy)


@pytest.mark.slow
def test_the_callback_converts_before_every_other_callback_without_patching_the_strategy():
    probe = SeeOptimizersAtFitStart()
    trainer = fit("callback", steps=1, callbacks=(probe,))
    assert probe.kinds == [LowRankOptimizer]
    assert not probe.patched
    assert isinstance(trainer.callbacks[0], LowRankCallback)


def test_the_callbacks_setup_puts_it_first_and_leaves_the_strategy_alone():
    probe, callback = SeeOptimizersAtFitStart(), LowRankCallback(**OPTIONS)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[probe, callback])
    setup_optimizers = trainer.strategy.setup_optimizers
    callback.setup(trainer, UserModule(), "fit")
    assert trainer.callbacks[:2] == [callback, probe]
    assert "setup_optimizers" not in vars(trainer.strategy)
    assert trainer.strategy.setup_optimizers == setup_optimizers
