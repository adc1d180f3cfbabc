"""An existing LightningModule, written as a user would (its own Adam and scheduler), trained
through LowRankCallback or Trainer(strategy="lowrank"): the optimizer actually stepping is a
LowRankOptimizer, the user's lr and schedule are kept, and target updates are low-rank."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_lowrank import LowRankOptimizer
from lit_lowrank.lightning import LowRankCallback, LowRankStrategy

RANK = 2


class UserClassifier(pl.LightningModule):
    def __init__(self, optimizer: type = torch.optim.Adam) -> None:
        super().__init__()
        self.optimizer = optimizer
        self.encoder = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.encoder(x)), y)

    def configure_optimizers(self):
        extra = {"momentum": 0.9, "weight_decay": 0.01} if self.optimizer is torch.optim.SGD else {}
        optimizer = self.optimizer(self.parameters(), lr=3e-3, **extra)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(32, 12, generator=g), torch.randint(0, 3, (32,), generator=g)),
                      batch_size=8)


ADOPTIONS = {
    "callback": lambda: dict(callbacks=[LowRankCallback(targets=["encoder"], rank=RANK, scale=1.0)]),
    "strategy": lambda: dict(strategy=LowRankStrategy(targets=["encoder"], rank=RANK, scale=1.0)),
}


def fit(adoption: str, steps: int) -> tuple[UserClassifier, pl.Trainer, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = UserClassifier()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", **ADOPTIONS[adoption]())
    trainer.fit(model, loader())
    return model, trainer, before


@pytest.mark.slow
@pytest.mark.parametrize("adoption", list(ADOPTIONS))
def test_user_adam_is_replaced_and_target_updates_are_low_rank(adoption):
    model, trainer, before = fit(adoption, steps=1)
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, LowRankOptimizer)
    assert trainer.lightning_module.trainer.strategy.optimizers[0] is optimizer
    assert all(g["initial_lr"] == 3e-3 for g in optimizer.param_groups)  # the user's lr
    for name in ("encoder.0.weight", "encoder.2.weight"):
        delta = dict(model.named_parameters())[name].detach() - before[name]
        assert delta.abs().sum() > 0
        assert torch.linalg.matrix_rank(delta).item() <= RANK
    head_delta = model.head.weight.detach() - before["head.weight"]
    assert torch.linalg.matrix_rank(head_delta).item() == 3  # dense AdamW: full rank (3×16)
    assert trainer.callback_metrics["optim/refreshes"].item() == 2  # telemetry: both encoder weights


@pytest.mark.slow
@pytest.mark.parametrize("adoption", list(ADOPTIONS))
def test_user_scheduler_drives_the_new_optimizer(adoption):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lr_scheduler.*")  # no step-order/override warnings
        _, trainer, _ = fit(adoption, steps=3)
    optimizer = trainer.optimizers[0]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([3e-3 * 0.5 ** 3] * len(optimizer.param_groups))
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is optimizer


@pytest.mark.slow
def test_no_matching_target_names_the_fix():
    with pytest.raises(ValueError, match="set `targets`"):
        trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             callbacks=[LowRankCallback(targets=["q_proj"])])
        trainer.fit(UserClassifier(), loader())


class Losses(pl.Callback):
    def __init__(self, stop_at: int | None = None) -> None:
        self.values: list[float] = []
        self.stop_at = stop_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(outputs["loss"].item())
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True  # an interruption


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.SGD])
@pytest.mark.parametrize("adoption", list(ADOPTIONS))
def test_resume_restores_the_converted_optimizer_and_user_scheduler(adoption, optimizer, tmp_path):
    def run(callbacks, ckpt_path=None):
        torch.manual_seed(0)
        trainer = pl.Trainer(max_steps=8, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             accelerator="cpu", default_root_dir=tmp_path, **_with_callbacks(adoption, callbacks))
        trainer.fit(UserClassifier(optimizer), loader(), ckpt_path=ckpt_path)
        return trainer

    full = Losses()
    run([full])
    first = Losses(stop_at=4)  # 4 batches per epoch: interrupted at the epoch boundary
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    run([first, checkpoint])
    second = Losses()
    run([second], ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    assert first.values + second.values == full.values


def _with_callbacks(adoption: str, callbacks: list) -> dict:
    options = ADOPTIONS[adoption]()
    options["callbacks"] = options.get("callbacks", []) + callbacks
    return options
