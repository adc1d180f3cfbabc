"""Evaluation metrics: the GLUE tasks' official metrics (:func:`glue_metrics`)."""

from lit_lowrank.extras import require

require("lightning", "torchmetrics")

from lit_lowrank.metrics.glue import GLUE_TASKS, MAIN_METRIC, PAPER_TASKS, check_task, glue_metrics, main_metric_key

__all__ = ["GLUE_TASKS", "MAIN_METRIC", "PAPER_TASKS", "check_task", "glue_metrics", "main_metric_key"]
