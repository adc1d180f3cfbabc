"""``GLUEClassification``: the sequence-classification task configured for one GLUE task —
its number of labels and its official metrics — from the task name alone."""

from __future__ import annotations

from lit_lowrank.data.glue_tasks import GLUE_SPECS
from lit_lowrank.lightning.tasks import SequenceClassification
from lit_lowrank.metrics.glue import check_task, glue_metrics


class GLUEClassification(SequenceClassification):
    """:class:`SequenceClassification` with ``num_labels`` and the validation metrics of
    ``task`` (:func:`lit_lowrank.metrics.glue_metrics`); STS-B is regression (MSE, one output).

    Args:
        task: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte or wnli.
    """

    def __init__(self, task: str) -> None:
        name = check_task(task)
        super().__init__(num_labels=GLUE_SPECS[name].num_labels, metrics=glue_metrics(name))
        self.glue_task = name
