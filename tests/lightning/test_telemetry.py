"""Telemetry: the low-rank summary printed at fit start on every path; ``train/lr`` is the lr
the step used; layers are named by parameter name; LearningRateMonitor keeps the user's keys."""

from __future__ import annotations

import logging
import re

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers.logger import DummyLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_lowrank.lightning import LowRankCallback, LowRankConfig, LowRankModule, LowRankStrategy


class UserClassifier(pl.LightningModule):
    """A user's module: Adam with a decay and a no-decay group, and a step-wise scheduler."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.encoder(x)), y)

    def configure_optimizers(self):
        weights = [p for p in self.parameters() if p.ndim == 2]
        biases = [p for p in self.parameters() if p.ndim == 1]
        optimizer = torch.optim.Adam([{"params": weights}, {"params": biases, "lr": 1e-3}], lr=3e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Recorder(DummyLogger):
    """Every logged metric, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[dict[str, float]] = []

    def log_metrics(self, metrics, step=None):
        self.history.append(dict(metrics))

    def values(self, key: str) -> list[float]:
        return [m[key] for m in self.history if key in m]


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(32, 12, generator=g), torch.randint(0, 3, (32,), generator=g)),
                      batch_size=8)


ADOPTIONS = {
    "plain": lambda: {},
    "callback": lambda: dict(callbacks=[LowRankCallback(targets=["encoder"], rank=2)]),
    "strategy": lambda: dict(strategy=LowRankStrategy(targets=["encoder"], rank=2)),
}


def fit(adoption: str, steps: int = 3, callbacks=()) -> tuple[pl.Trainer, Recorder]:
    torch.manual_seed(0)
    recorder = Recorder()
    options = ADOPTIONS[adoption]()
    options["callbacks"] = [*options.get("callbacks", []), *callbacks]
    trainer = pl.Trainer(max_steps=steps, logger=recorder, log_every_n_steps=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", **options)
    trainer.fit(UserClassifier(), loader())
    return trainer, recorder


@pytest.mark.slow
def test_lr_monitor_keeps_the_users_keys():
    _, plain = fit("plain", callbacks=[LearningRateMonitor()])
    user_keys = {k for m in plain.history for k in m if k.startswith("lr-")}
    assert user_keys == {"lr-Adam/pg1", "lr-Adam/pg2"}
    for adoption in ("callback", "strategy"):
        _, recorder = fit(adoption, callbacks=[LearningRateMonitor()])
        keys = {k for m in recorder.history for k in m if k.startswith("lr-")}
        assert keys == user_keys | {"lr-Adam/pg1-dense"}  # pg1's dense part (the head's weight)
        for key in user_keys:
            assert recorder.values(key) == plain.values(key), key
        assert recorder.values("lr-Adam/pg1-dense") == plain.values("lr-Adam/pg1")


@pytest.mark.slow
@pytest.mark.parametrize("adoption", ["callback", "strategy"])
def test_layers_are_named_by_parameter_name_on_the_conversion_path(adoption):
    trainer, _ = fit(adoption, steps=1)
    logged = trainer.callback_metrics
    assert logged["optim/layers/encoder.0.weight/rank"].item() == 2
    assert logged["optim/layers/encoder.2.weight/refreshes"].item() == 1


@pytest.mark.slow
def test_train_lr_at_step_k_is_the_lr_used_by_step_k():
    _, recorder = fit("callback", steps=4)
    assert recorder.values("train/lr") == pytest.approx([3e-3 * 0.5 ** k for k in range(4)])


@pytest.mark.slow
@pytest.mark.parametrize("adoption", ["callback", "strategy", "module"])
def test_the_summary_is_printed_at_fit_start(adoption, small_llama, caplog):
    caplog.set_level(logging.INFO)
    if adoption == "module":
        trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, accelerator="cpu")
        data = torch.randint(0, 64, (8, 9), generator=torch.Generator().manual_seed(0))
        module = LowRankModule(small_llama(), lowrank=LowRankConfig(rank=4, warmup=0))
        trainer.fit(module, DataLoader(data, batch_size=4))
        assert re.search(r"network\.model\.layers\.1\.mlp\.down_proj\.weight +\| 32×64 \| 4 +\| left", caplog.text)
        assert "network.lm_head.weight" in caplog.text and "output head" in caplog.text
    else:
        fit(adoption, steps=1)
        assert re.search(r"encoder\.0\.weight +\| 24×12 \| 2 +\| right", caplog.text)
        assert re.search(r"head\.weight +\| 3×16 +\| - +\| dense \| not matched by targets", caplog.text)
    assert "Optimizer state (predicted)" in caplog.text


def test_monitor_names_of_two_optimizers_of_one_class_survive_the_conversion():
    from lightning.pytorch.utilities.types import LRSchedulerConfig

    from lit_lowrank.lightning.optimizer_conversion import convert_optimizers

    model = UserClassifier()
    optimizers = [torch.optim.Adam(model.encoder.parameters()), torch.optim.Adam(model.head.parameters())]
    configs = [LRSchedulerConfig(torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0)) for o in optimizers]
    before = LearningRateMonitor()._find_names_from_schedulers(configs)[0]  # Lightning's own naming
    assert before == [["lr-Adam"], ["lr-Adam-1"]]
    convert_optimizers(model, optimizers, configs, LowRankConfig(targets=["encoder"], rank=2))
    after = LearningRateMonitor()._find_names_from_schedulers(configs)[0]
    assert after == [["lr-Adam/pg1", "lr-Adam/pg1-dense"], ["lr-Adam-1"]]  # the untouched head keeps its key
