"""``communication: lowrank`` under Lightning: DDP with projected all-reduces trains the weights
of plain DDP and logs the bytes it sent; what cannot work with it is refused at setup."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning.pytorch.strategies import DDPStrategy

from lit_lowrank.lightning import (DDPLowRankStrategy, LowRankCallback, LowRankCommunicationCallback, LowRankConfig,
                                   LowRankStrategy)
from test_strategy import TwoLayer

RANK = 2


SPAWN_GLOO = {"start_method": "spawn", "process_group_backend": "gloo"}
OPTIONS = dict(targets=["encoder"], rank=RANK, update_gap=2)


def _fit(communication: str, callback: bool = False) -> tuple[TwoLayer, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 10, generator=g), torch.randint(0, 2, (32,), generator=g))
    if callback:  # an existing project: Lightning's own DDP strategy and LowRankCallback
        strategy, callbacks = DDPStrategy(**SPAWN_GLOO), [LowRankCallback(communication=communication, **OPTIONS)]
    else:
        strategy, callbacks = DDPLowRankStrategy(communication=communication, ddp_kwargs=SPAWN_GLOO, **OPTIONS), []
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_steps=4, logger=False, callbacks=callbacks,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    torch.manual_seed(0)
    model = TwoLayer()
    trainer.fit(model, DataLoader(data, batch_size=4))
    return model, trainer.callback_metrics


@pytest.mark.slow
def test_ddp_lowrank_communication_trains_plain_ddp_weights_and_logs_bytes():
    plain, plain_metrics = _fit("full")
    ours, metrics = _fit("lowrank")
    for a, b in zip(ours.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())
    # DDP's own all-reduce is not counted; its last step (no refresh) broadcast no shared projector state
    assert plain_metrics["optim/comm_bytes"].item() == 0
    encoder = ours.encoder.weight
    low_rank = RANK * max(encoder.shape) * 4  # step 4 does not refresh (update_gap 2: steps 1 and 3 do)
    full = sum(p.numel() * 4 for p in ours.parameters()) - encoder.numel() * 4
    assert metrics["optim/comm_bytes"].item() == low_rank + full
    through_callback, callback_metrics = _fit("lowrank", callback=True)
    for a, b in zip(through_callback.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert callback_metrics["optim/comm_bytes"].item() == low_rank + full


def _trainer(**options) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, **options)


def test_refuses_a_strategy_without_ddp():
    with pytest.raises(ValueError, match="strategy='ddp_lowrank'"):
        LowRankCommunicationCallback().setup(_trainer(strategy=LowRankStrategy()), TwoLayer(), "fit")


@pytest.mark.parametrize("options, match", [
    (dict(gradient_clip_val=1.0), "gradient_clip_val"),
    (dict(strategy=DDPLowRankStrategy(ddp_kwargs={"ddp_comm_hook": lambda state, bucket: None})), "ddp_comm_hook"),
])
def test_refuses_what_needs_the_full_gradient(options, match):
    options.setdefault("strategy", "ddp")
    with pytest.raises(ValueError, match=match):
        LowRankCommunicationCallback().setup(_trainer(devices=2, **options), TwoLayer(), "fit")


def test_config_refuses_unknown_and_disabled():
    with pytest.raises(ValueError, match="expected one of"):
        LowRankConfig(communication="sparse")
    with pytest.raises(ValueError, match="enabled: true"):
        LowRankConfig(communication="lowrank", enabled=False)


def test_config_adds_the_callback():
    from lit_lowrank.lightning.adoption import config_callbacks

    assert [type(c) for c in config_callbacks(LowRankConfig(communication="lowrank"))] == [
        LowRankCommunicationCallback]
    assert config_callbacks(LowRankConfig()) == []
