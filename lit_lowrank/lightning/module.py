"""``LowRankModule``: a LightningModule that trains any ``nn.Module`` for a :class:`Task` with
the optimizer and learning-rate schedule described by a :class:`LowRankConfig`."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lit_lowrank.lightning.adoption import config_callbacks
from lit_lowrank.lightning.config import LowRankConfig
from lit_lowrank.lightning.lr_schedule import warmup_decay
from lit_lowrank.lightning.refusals import check_strategy, check_transform_trainer
from lit_lowrank.lightning.tasks import CausalLM, Task
from lit_lowrank.optim.sharding import shard_blocks
from lit_lowrank.lightning.telemetry import LowRankTelemetry


class LowRankModule(pl.LightningModule):
    """Train ``network`` for ``task`` with a low-rank (or, if disabled, plain AdamW) optimizer.

    Args:
        network: the model, e.g. :class:`lit_lowrank.models.Llama` or a HF
            ``AutoModelForSequenceClassification``; in YAML any importable ``class_path``.
        task: :class:`CausalLM` (default; batches of ``(B, T+1)`` tokens) or
            :class:`SequenceClassification` (batches of model inputs + ``labels``, with a
            pluggable torchmetrics collection for validation).
        lowrank: the optimizer and LR schedule (the YAML's ``lowrank:`` section).

    Logs ``train/loss`` (progress bar) every step, ``val/loss`` and the task's metrics (``val/ppl``
    for language modelling) every validation; :class:`LowRankTelemetry` adds lr, optimizer-state
    bytes and subspace refreshes. With several validation dataloaders the prefix is
    ``val_<name>/`` if the datamodule has ``val_names``, else ``val<idx>/``.

    Extension point: :meth:`configure_optimizers` builds the optimizer with
    :meth:`make_optimizer` and the schedule with :meth:`make_lr_scheduler`; a subclass may set
    ``automatic_optimization = False`` and step the optimizer itself. ``lowrank.layerwise`` adds
    :class:`~lit_lowrank.lightning.layerwise.LayerwiseCallback` (updates inside backward),
    ``lowrank.communication: lowrank``
    :class:`~lit_lowrank.lightning.communication.LowRankCommunicationCallback`.
    """

    def __init__(self, network: nn.Module, task: Task | None = None,
                 lowrank: LowRankConfig | None = None) -> None:
        super().__init__()
        self.network = network
        self.task = task if task is not None else CausalLM()
        self.lowrank = lowrank if lowrank is not None else LowRankConfig()
        self.lowrank.prepare(self.network)

    def setup(self, stage: str) -> None:
        if self.lowrank.enabled:
            check_strategy(self.trainer.strategy, self.lowrank)
        check_transform_trainer(self.trainer, self.lowrank)
        data_vocab = getattr(self.trainer.datamodule, "vocab_size", None)
        model_vocab = getattr(getattr(self.network, "config", None), "vocab_size", None)
        if data_vocab is not None and model_vocab is not None and data_vocab > model_vocab:
            raise ValueError(f"the data has {data_vocab} token ids but the network's vocabulary has "
                             f"{model_vocab}; set the network's vocab_size to {data_vocab}")
        # classification: data, task and head must agree, else a 2-way task trains a 3-way head
        labels = {"data": getattr(self.trainer.datamodule, "num_labels", None),
                  "task": getattr(self.task, "num_labels", None),
                  "network": getattr(getattr(self.network, "config", None), "num_labels", None)}
        given = {k: v for k, v in labels.items() if v is not None}
        if labels["task"] is not None and len(set(given.values())) > 1:
            raise ValueError(f"num_labels disagree: {given}; set the same num_labels on the network, task and data")

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy`` (``strategy: fsdp_lowrank``), shard the
        network with FSDP2: each repeated block, then the root (:func:`shard_blocks`)."""
        if self.device_mesh is not None:
            shard_blocks(self.network, self.device_mesh["data_parallel"])

    # ------------------------------------------------------------------ steps
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.network(*args, **kwargs)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        output = self.task.step(self.network, batch)
        self.log("train/loss", output.loss, prog_bar=True, batch_size=output.count)
        return output.loss

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.task.update(self.task.step(self.network, batch), dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.task.update(self.task.step(self.network, batch), dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_task_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_task_metrics("test")

    def _log_task_metrics(self, stage: str) -> None:
        results = self.task.compute()
        names = getattr(self.trainer.datamodule, f"{stage}_names", None) if self._trainer else None
        for index, values in enumerate(results):
            if len(results) == 1:
                prefix = stage
            else:
                prefix = f"{stage}_{names[index]}" if names else f"{stage}{index}"
            for key, value in values.items():
                self.log(f"{prefix}/{key}", value, prog_bar=key == "loss" and index == 0, sync_dist=True)

    # ------------------------------------------------------------------ optimizers
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.make_optimizer()
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.make_lr_scheduler(optimizer), "interval": "step"}}

    def make_optimizer(self) -> torch.optim.Optimizer:
        return self.lowrank.build(self.network)

    def make_lr_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """Warm-up + decay over the run's optimizer steps (``Trainer.estimated_stepping_batches``)."""
        total = self.trainer.estimated_stepping_batches
        if not 0 < total < float("inf"):
            raise ValueError("the LR schedule needs a finite run: set trainer.max_steps or max_epochs")
        total = int(total)
        return warmup_decay(optimizer, warmup=self.lowrank.warmup_steps(total), total=total,
                            min_ratio=self.lowrank.min_lr_ratio, decay=self.lowrank.lr_schedule)

    def configure_callbacks(self) -> list[pl.Callback]:
        return [LowRankTelemetry(), *config_callbacks(self.lowrank)]
