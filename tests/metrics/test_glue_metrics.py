"""GLUE metrics equal the plain formulas (scipy / scikit-learn) on the same predictions,
accumulated over several batches as in a validation epoch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from lit_lowrank.metrics.glue import GLUE_TASKS, MAIN_METRIC, PAPER_TASKS, glue_metrics, main_metric_key


def accumulate(task: str, preds: torch.Tensor, target: torch.Tensor, batches: int = 3) -> dict[str, float]:
    metrics = glue_metrics(task)
    for p, t in zip(preds.chunk(batches), target.chunk(batches)):
        metrics.update(p, t)
    return {k: v.item() for k, v in metrics.compute().items()}


def labels(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, classes, (n,), generator=g)
    noise = torch.randint(0, classes, (n,), generator=g)
    keep = torch.rand(n, generator=g) < 0.6  # 60% right, the rest random: a non-trivial score
    return torch.where(keep, target, noise), target


def test_cola_matthews():
    preds, target = labels(97, 2, 0)
    got = accumulate("cola", preds, target)
    assert set(got) == {"mcc"}
    assert got["mcc"] == pytest.approx(matthews_corrcoef(target.numpy(), preds.numpy()), abs=1e-6)


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_f1_and_accuracy(task):
    preds, target = labels(101, 2, 1)
    got = accumulate(task, preds, target)
    assert got["f1"] == pytest.approx(f1_score(target.numpy(), preds.numpy()), abs=1e-6)
    assert got["accuracy"] == pytest.approx(accuracy_score(target.numpy(), preds.numpy()), abs=1e-6)


def test_stsb_pearson_spearman():
    g = torch.Generator().manual_seed(2)
    target = torch.rand(90, generator=g) * 5
    preds = target + torch.randn(90, generator=g)
    got = accumulate("stsb", preds, target)
    assert got["pearson"] == pytest.approx(pearsonr(preds.numpy(), target.numpy())[0], abs=1e-5)
    assert got["spearman"] == pytest.approx(spearmanr(preds.numpy(), target.numpy())[0], abs=1e-5)


@pytest.mark.parametrize("task", ["sst2", "mnli", "qnli", "rte", "wnli"])
def test_accuracy(task):
    classes = 3 if task == "mnli" else 2
    preds, target = labels(99, classes, 3)
    got = accumulate(task, preds, target)
    assert set(got) == {"accuracy"}
    assert got["accuracy"] == pytest.approx(float(np.mean(preds.numpy() == target.numpy())), abs=1e-6)


def test_main_scores():
    assert set(MAIN_METRIC) == set(GLUE_TASKS) and set(PAPER_TASKS) == set(GLUE_TASKS) - {"wnli"}
    for task in GLUE_TASKS:  # the main metric is one the collection computes
        assert MAIN_METRIC[task] in glue_metrics(task).keys()
    assert main_metric_key("cola") == "val/mcc"
    assert main_metric_key("mnli") == "val_matched/accuracy"
    assert main_metric_key("STS-B") == "val/pearson"
    with pytest.raises(ValueError, match="expected one of"):
        glue_metrics("imdb")
