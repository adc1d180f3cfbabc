"""Warm-up + decay schedules against their closed forms (GaLore's cosine-with-min-lr, HF's linear)."""

from __future__ import annotations

import math

import pytest
import torch

from lit_lowrank.lightning.lr_schedule import warmup_decay, warmup_decay_factor


@pytest.mark.parametrize("step, expected", [
    (0, 0.0), (5, 0.5), (10, 1.0),
    (55, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))),
    (100, 0.1), (150, 0.1),
])
def test_factor_closed_form(step, expected):
    assert warmup_decay_factor(step, warmup=10, total=100, min_ratio=0.1) == pytest.approx(expected)


@pytest.mark.parametrize("step, expected", [(0, 0.0), (5, 0.5), (10, 1.0), (40, 1 - 30 / 90), (100, 0.0), (130, 0.0)])
def test_linear_decay_matches_transformers(step, expected):
    """HF's get_linear_schedule_with_warmup (the GaLore GLUE script's schedule), written out."""
    assert warmup_decay_factor(step, warmup=10, total=100, min_ratio=0.0, decay="linear") == pytest.approx(expected)


def test_constant_after_warmup():
    assert warmup_decay_factor(70, warmup=10, total=100, min_ratio=0.1, decay="constant") == 1.0


def test_unknown_decay_is_refused():
    with pytest.raises(ValueError, match="expected one of"):
        warmup_decay_factor(1, warmup=0, total=10, min_ratio=0.0, decay="step")


def test_scheduler_sets_every_group_lr():
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [w], "lr": 1.0}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 2.0}])
    sched = warmup_decay(opt, warmup=4, total=8, min_ratio=0.1)
    for _ in range(2):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 1.0])
