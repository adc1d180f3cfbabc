"""Tasks: how a wrapped network turns a batch into a loss, and what validation measures.

A task is an ``nn.Module`` so that its torchmetrics state follows the LightningModule to its
device. :class:`~lit_lowrank.lightning.LowRankModule` calls :meth:`Task.step` for every batch,
:meth:`Task.update` on validation/test batches and :meth:`Task.compute` at epoch end.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric, MetricCollection


@dataclass
class TaskOutput:
    """One batch's result: the mean ``loss``, ``preds``/``target`` for metrics, and the number
    of items (tokens or examples) the loss is averaged over."""

    loss: Tensor
    preds: Tensor
    target: Tensor
    count: int


class Task(nn.Module, ABC):
    """Loss and validation metrics of one kind of training.

    Validation can have several dataloaders (e.g. MNLI matched/mismatched): each gets its own
    copy of the metrics, indexed by ``dataloader_idx``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._per_loader = nn.ModuleList()

    @abstractmethod
    def step(self, model: nn.Module, batch: Any) -> TaskOutput:
        """Run ``model`` on ``batch`` and return the loss (and what metrics need)."""

    @abstractmethod
    def new_metrics(self) -> MetricCollection:
        """A fresh collection of the metrics one validation dataloader is scored with."""

    def update(self, output: TaskOutput, dataloader_idx: int = 0) -> None:
        loss_metric, metrics = self._loader_metrics(dataloader_idx)
        loss_metric.update(output.loss.detach(), weight=output.count)
        if metrics:
            metrics.update(output.preds, output.target)

    def compute(self) -> list[dict[str, Tensor]]:
        """Per dataloader: ``{"loss": mean loss, **metrics}``; then resets every metric."""
        results = []
        for pair in self._per_loader:
            loss_metric, metrics = pair
            values = {"loss": loss_metric.compute()}
            values.update(self.derived(values["loss"]))
            if metrics:
                values.update(metrics.compute())
            # fresh states outside inference mode: after Trainer.validate, fit's validation
            # (under no_grad) could not update inference tensors in place
            with torch.inference_mode(False):
                metrics.reset()
                loss_metric.reset()
            results.append(values)
        return results

    def derived(self, mean_loss: Tensor) -> dict[str, Tensor]:
        """Metrics that are functions of the mean loss (perplexity); none by default."""
        return {}

    def _loader_metrics(self, index: int) -> tuple[MeanMetric, MetricCollection]:
        while len(self._per_loader) <= index:
            self._per_loader.append(nn.ModuleList([MeanMetric(), self.new_metrics()]))
        loss_metric, metrics = self._per_loader[index]
        return loss_metric, metrics


class CausalLM(Task):
    """Next-token prediction. A batch is a ``(B, T+1)`` token tensor (as litdata's
    ``TokensLoader`` yields) or a mapping with ``input_ids``; the model sees ``[:, :-1]`` and is
    scored on ``[:, 1:]`` with token-mean cross-entropy. Validation adds perplexity
    ``exp(mean loss)``, the mean taken over all tokens of the epoch."""

    def step(self, model: nn.Module, batch: Any) -> TaskOutput:
        tokens = (batch["input_ids"] if isinstance(batch, Mapping) else batch).long()
        inputs, target = tokens[:, :-1], tokens[:, 1:]
        logits = _logits(model(input_ids=inputs))
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1))
        return TaskOutput(loss, logits, target, target.numel())

    def new_metrics(self) -> MetricCollection:
        return MetricCollection({})

    def derived(self, mean_loss: Tensor) -> dict[str, Tensor]:
        return {"ppl": torch.exp(mean_loss.clamp(max=math.log(torch.finfo(torch.float32).max)))}


class SequenceClassification(Task):
    """Sentence(-pair) classification or regression with a model such as
    ``AutoModelForSequenceClassification``.

    A batch is a mapping of the model's inputs (``input_ids``, ``attention_mask``, ...) plus
    ``labels``. With ``num_labels == 1`` it is regression (MSE on the single logit, STS-B);
    otherwise cross-entropy over ``num_labels`` classes, predictions are the argmax.

    Args:
        num_labels: the classifier's output size (1 = regression).
        metrics: the validation metrics, called as ``metric(preds, labels)`` — e.g. a
            ``MetricCollection`` of accuracy/F1/Matthews; cloned per validation dataloader.
            ``None`` logs only the loss.
    """

    def __init__(self, num_labels: int = 2, metrics: Metric | MetricCollection | None = None) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1 (1 = regression), got {num_labels}")
        self.num_labels = num_labels
        if isinstance(metrics, Metric):
            metrics = MetricCollection([metrics])
        self._template = metrics

    def step(self, model: nn.Module, batch: Mapping[str, Tensor]) -> TaskOutput:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        labels = batch["labels"]
        logits = _logits(model(**inputs))
        if self.num_labels == 1:
            preds = logits.squeeze(-1).float()
            loss = F.mse_loss(preds, labels.float())
        else:
            loss = F.cross_entropy(logits.float(), labels)
            preds = logits.argmax(-1)
        return TaskOutput(loss, preds, labels, labels.shape[0])

    def new_metrics(self) -> MetricCollection:
        return MetricCollection({}) if self._template is None else self._template.clone()


def _logits(output: Any) -> Tensor:
    """Logits from a HF ``ModelOutput``, a tuple whose first item is the logits, or a tensor."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    return output[0]
