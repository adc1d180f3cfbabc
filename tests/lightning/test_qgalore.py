"""Q-GaLore from the ``lowrank:`` config: INT8 target weights (QuantizedLinear), INT4 basis and
the lazy schedule train through Lightning and resume exactly from a checkpoint."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from torch.utils.data import DataLoader

from lit_lowrank.lightning import LowRankConfig, LowRankModule
from lit_lowrank.transforms.int_weights import QuantizedLinear

VOCAB = 64
QGALORE = dict(rank=4, update_gap=2, lr=0.01, warmup=2, lr_schedule="constant", schedule="lazy",
               schedule_args={"queue_size": 2, "threshold": 0.0},  # grow on every 2nd refresh
               projector_args={"quantizer": "int", "quantizer_args": {"bits": 4, "group_size": 64}},
               weight_bits=8, weight_args={"group_size": 64})


class RecordLosses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def run(small_llama, max_steps, ckpt_path=None, callbacks=()):
    """One fixed batch per epoch, so the resumed run trains on exactly what the uninterrupted run
    sees; a constant LR after warm-up, so the 4-step and the 8-step runs share their schedule."""
    pl.seed_everything(0)
    module = LowRankModule(small_llama(VOCAB), lowrank=LowRankConfig(**QGALORE))
    tokens = torch.randint(0, VOCAB, (4, 33), generator=torch.Generator().manual_seed(0))
    recorder = RecordLosses()
    trainer = pl.Trainer(max_steps=max_steps, limit_val_batches=0, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", callbacks=[recorder, *callbacks],
                         enable_checkpointing=bool(callbacks))
    trainer.fit(module, train_dataloaders=DataLoader(tokens, batch_size=4), ckpt_path=ckpt_path)
    return recorder, trainer, module


@pytest.mark.slow
def test_qgalore_int8_run_resumes_exactly(small_llama, tmp_path):
    full, full_trainer, full_module = run(small_llama, max_steps=8)
    layers = [m for m in full_module.network.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 14 and all(layer.updates == 8 for layer in layers)
    assert all(torch.isfinite(torch.tensor(full.losses)))
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_on_train_epoch_end=True, save_top_k=-1)
    first, _, _ = run(small_llama, max_steps=4, callbacks=[checkpoint])
    (ckpt,) = tmp_path.glob("*step=4.ckpt")
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert not any(key.endswith("q_proj.weight") for key in state)  # INT8 codes only, no float copy
    second, resumed_trainer, resumed_module = run(small_llama, max_steps=8, ckpt_path=str(ckpt))
    torch.testing.assert_close(first.losses + second.losses, full.losses, rtol=0, atol=0)
    optimizer = resumed_trainer.optimizers[0]
    assert optimizer.refresh_count == full_trainer.optimizers[0].refresh_count < 14 * 4  # lazy: fewer than T=2
    for (name, a), b in zip(full_module.state_dict().items(), resumed_module.state_dict().values()):
        assert torch.equal(a, b), name


def test_weight_bits_needs_the_lowrank_optimizer():
    with pytest.warns(DeprecationWarning, match="weight_bits"), pytest.raises(ValueError, match="int-weights"):
        LowRankConfig(enabled=False, weight_bits=8)
