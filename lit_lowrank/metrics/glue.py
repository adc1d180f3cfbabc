"""The official GLUE metric(s) of each task as a torchmetrics ``MetricCollection``, and the
"main" score the papers' tables report per task.

=======  ===========================  =================================
task     metrics (logged keys)        main score in the papers' table
=======  ===========================  =================================
cola     ``mcc`` (Matthews corr.)     ``mcc``
sst2     ``accuracy``                 ``accuracy``
mrpc     ``f1``, ``accuracy``         ``f1``
qqp      ``f1``, ``accuracy``         ``accuracy``
stsb     ``pearson``, ``spearman``    ``pearson``
mnli     ``accuracy`` (matched and    ``accuracy`` on validation_matched
         mismatched, one collection
         per validation set)
qnli     ``accuracy``                 ``accuracy``
rte      ``accuracy``                 ``accuracy``
wnli     ``accuracy``                 ``accuracy`` (not in the papers' average)
=======  ===========================  =================================

The main scores follow GaLore (Zhao et al. 2024, Table 4) and LoRA's RoBERTa tables, whose
MRPC values are F1 and QQP values accuracy. Predictions are class indices (argmax of the
logits); for STS-B the single regression output.
"""

from __future__ import annotations

from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryF1Score, BinaryMatthewsCorrCoef, MulticlassAccuracy
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from lit_lowrank.data.glue_tasks import GLUE_TASKS, MAIN_METRIC, PAPER_TASKS, check_task

__all__ = ["GLUE_TASKS", "MAIN_METRIC", "PAPER_TASKS", "check_task", "glue_metrics", "main_metric_key"]

def glue_metrics(task: str) -> MetricCollection:
    """A fresh collection of ``task``'s metrics, called as ``collection(preds, labels)`` with
    ``preds`` of shape ``(B,)``: class indices, or float scores for ``stsb``."""
    task = check_task(task)
    if task == "stsb":
        return MetricCollection({"pearson": PearsonCorrCoef(), "spearman": SpearmanCorrCoef()})
    if task == "cola":
        return MetricCollection({"mcc": BinaryMatthewsCorrCoef()})
    if task in ("mrpc", "qqp"):
        return MetricCollection({"f1": BinaryF1Score(), "accuracy": BinaryAccuracy()})
    if task == "mnli":
        return MetricCollection({"accuracy": MulticlassAccuracy(num_classes=3, average="micro")})
    return MetricCollection({"accuracy": BinaryAccuracy()})


def main_metric_key(task: str, stage: str = "val") -> str:
    """The logged name of ``task``'s main score, as :class:`~lit_lowrank.lightning.LowRankModule`
    logs it: ``val/mcc`` for CoLA, ``val_matched/accuracy`` for MNLI (named validation sets)."""
    task = check_task(task)
    prefix = f"{stage}_matched" if task == "mnli" else stage
    return f"{prefix}/{MAIN_METRIC[task]}"
