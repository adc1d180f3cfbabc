"""The nine GLUE tasks, in one table: each task's name, the metric the papers report, and where
its text and labels are (read by :mod:`lit_lowrank.data.glue`, :mod:`lit_lowrank.metrics.glue`
and ``scripts/glue_table.py``). Plain Python: no Lightning, datasets or torchmetrics needed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GLUETaskSpec:
    """One task: its name (the folder of the GLUE distribution: ``CoLA``), the metric the papers
    report, and where its text and labels are, on the hub and in the GLUE TSV files.

    ``tsv_columns`` are ``(text_a, text_b or None, label)``: header names, or column indices
    when ``tsv_header`` is false. ``labels`` are the class names in hub order (``()`` for the
    regression task STS-B). ``validation`` maps each validation set's name to its
    ``(hub split, TSV file)``.
    """

    folder: str
    main_metric: str
    hub_columns: tuple[str, str | None]
    tsv_columns: tuple[Any, Any, Any]
    labels: tuple[str, ...]
    validation: dict[str, tuple[str, str]]
    tsv_header: bool = True

    @property
    def num_labels(self) -> int:
        return len(self.labels) or 1


_DEV = {"validation": ("validation", "dev.tsv")}
_PAIR = ("sentence1", "sentence2")

GLUE_SPECS: dict[str, GLUETaskSpec] = {
    "cola": GLUETaskSpec("CoLA", "mcc", ("sentence", None), (3, None, 1), ("unacceptable", "acceptable"), _DEV,
                         tsv_header=False),
    "sst2": GLUETaskSpec("SST-2", "accuracy", ("sentence", None), ("sentence", None, "label"), ("negative", "positive"), _DEV),
    "mrpc": GLUETaskSpec("MRPC", "f1", _PAIR, ("#1 String", "#2 String", "Quality"), ("not_equivalent", "equivalent"),
                         _DEV),
    "qqp": GLUETaskSpec("QQP", "accuracy", ("question1", "question2"), ("question1", "question2", "is_duplicate"),
                        ("not_duplicate", "duplicate"), _DEV),
    "stsb": GLUETaskSpec("STS-B", "pearson", _PAIR, ("sentence1", "sentence2", "score"), (), _DEV),
    "mnli": GLUETaskSpec("MNLI", "accuracy", ("premise", "hypothesis"), ("sentence1", "sentence2", "gold_label"),
                         ("entailment", "neutral", "contradiction"),
                         {"matched": ("validation_matched", "dev_matched.tsv"),
                          "mismatched": ("validation_mismatched", "dev_mismatched.tsv")}),
    "qnli": GLUETaskSpec("QNLI", "accuracy", ("question", "sentence"), ("question", "sentence", "label"),
                         ("entailment", "not_entailment"), _DEV),
    "rte": GLUETaskSpec("RTE", "accuracy", _PAIR, _PAIR + ("label",), ("entailment", "not_entailment"), _DEV),
    "wnli": GLUETaskSpec("WNLI", "accuracy", _PAIR, _PAIR + ("label",), ("not_entailment", "entailment"), _DEV),
}

GLUE_TASKS = tuple(GLUE_SPECS)
MAIN_METRIC = {task: spec.main_metric for task, spec in GLUE_SPECS.items()}
"""Task → the metric key the papers' table reports."""

PAPER_TASKS = ("cola", "stsb", "mrpc", "rte", "sst2", "mnli", "qnli", "qqp")
"""The tasks of the papers' GLUE table (no WNLI), in GaLore Table 4's column order."""


def check_task(task: str) -> str:
    """``task`` lower-cased (``SST-2`` → ``sst2``), or a ``ValueError`` listing the GLUE task names."""
    name = task.lower().replace("-", "")
    if name not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; expected one of {GLUE_TASKS}")
    return name
