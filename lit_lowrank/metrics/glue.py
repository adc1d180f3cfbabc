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

GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")

MAIN_METRIC = {"cola": "mcc", "sst2": "accuracy", "mrpc": "f1", "qqp": "accuracy", "stsb": "pearson",
               "mnli": "accuracy", "qnli": "accuracy", "rte": "accuracy", "wnli": "accuracy"}
"""Task → the metric key the papers' table reports."""

PAPER_TASKS = ("cola", "stsb", "mrpc", "rte", "sst2", "mnli", "qnli", "qqp")
"""The tasks of the papers' GLUE table (no WNLI), in GaLore Table 4's column order."""


def check_task(task: str) -> str:
    """``task`` lower-cased, or a ``ValueError`` listing the GLUE task names."""
    name = task.lower().replace("-", "")
    if name not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; expected one of {GLUE_TASKS}")
    return name


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
