"""Layer-wise updates under Lightning (``layerwise: true``): the same trajectory and LR schedule
as the standard mode — also with accumulate_grad_batches, including a window cut short at the
end of an epoch — and clear errors for what it cannot do."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lit_lowrank.lightning import LowRankCallback, LowRankConfig, LowRankModule
from lit_lowrank.lightning.layerwise import LayerwiseCallback


def trainer(**kwargs) -> pl.Trainer:
    options = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, accelerator="cpu", devices=1, limit_val_batches=0)
    options.update(kwargs)
    return pl.Trainer(**options)


def tokens(n: int = 20, length: int = 13, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))


class GradientsAfterBackward(pl.Callback):
    """Records how many gradient entries are alive right after each backward."""

    def __init__(self):
        self.live = []

    def on_after_backward(self, trainer, pl_module):
        self.live.append(sum(p.grad.numel() for p in pl_module.parameters() if p.grad is not None))


def fit(small_llama, *, layerwise: bool, batches: int, **trainer_options):
    """One epoch over ``batches`` batches of 4 sequences; returns weights, last lr, steps."""
    torch.manual_seed(0)
    config = LowRankConfig(rank=4, update_gap=2, lr=0.01, weight_decay=0.1, warmup=1, layerwise=layerwise)
    module = LowRankModule(small_llama(), lowrank=config)
    gradients = GradientsAfterBackward()
    t = trainer(max_epochs=1, callbacks=[gradients], **trainer_options)
    t.fit(module, DataLoader(tokens(4 * batches), batch_size=4))
    assert any(isinstance(c, LayerwiseCallback) for c in t.callbacks) == layerwise
    n_params = sum(p.numel() for p in module.parameters())
    if trainer_options["accumulate_grad_batches"] == 1:  # layer-wise: every gradient freed inside backward
        assert gradients.live == ([0] * batches if layerwise else [n_params] * batches)
    lr = t.optimizers[0].param_groups[0]["lr"]
    return {n: p.detach().clone() for n, p in module.named_parameters()}, lr, t.global_step


@pytest.mark.slow
@pytest.mark.parametrize("accumulation, batches", [(1, 3), (2, 5)])
def test_layerwise_fit_matches_standard(small_llama, accumulation, batches):
    """accumulate 2 over 5 batches: windows [0, 1], [2, 3] and the epoch's last batch alone —
    3 optimizer steps, with refreshes at steps 1 and 3 and a projected accumulation at step 2."""
    standard, lr, steps = fit(small_llama, layerwise=False, batches=batches, accumulate_grad_batches=accumulation)
    layerwise, layerwise_lr, layerwise_steps = fit(small_llama, layerwise=True, batches=batches,
                                                   accumulate_grad_batches=accumulation)
    assert steps == layerwise_steps == 3
    assert layerwise_lr == lr
    for name, value in standard.items():
        if accumulation == 1:
            assert torch.equal(layerwise[name], value), name
        else:  # projections summed instead of gradients: the order of float32 sums differs
            torch.testing.assert_close(layerwise[name], value, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_layerwise_with_lowrank_callback_on_a_plain_module(small_llama):
    """An existing LightningModule with LowRankCallback: add LayerwiseCallback next to it."""

    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.network = small_llama()

        def training_step(self, batch, batch_idx):
            return self.network(batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    module = Plain()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    layerwise = LayerwiseCallback()
    t = trainer(max_steps=2, callbacks=[LowRankCallback(rank=4), layerwise])
    t.fit(module, DataLoader(tokens(8), batch_size=4))
    assert all(not torch.equal(p.detach(), before[n]) for n, p in module.named_parameters())
    assert t.global_step == 2 and layerwise.updates is None  # detached at the end of training


@pytest.mark.slow
def test_refuses_global_clipping(small_llama):
    module = LowRankModule(small_llama(), lowrank=LowRankConfig(rank=4, layerwise=True))
    with pytest.raises(ValueError, match="gradient_clip_val=None"):
        trainer(max_steps=1, gradient_clip_val=1.0).fit(module, DataLoader(tokens(4), batch_size=4))


def test_refuses_plain_adamw():
    with pytest.raises(ValueError, match="enabled: true"):
        LowRankConfig(enabled=False, layerwise=True)
