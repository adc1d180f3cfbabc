"""``LowRankConfig`` refuses what the optimizer would refuse, when it is built (parse time in the
CLI), and a warm-up longer than the run."""

from __future__ import annotations

import math

import pytest

from lit_lowrank import UnknownComponentError
from lit_lowrank.lightning import LowRankConfig


@pytest.mark.parametrize("options, error, message", [
    ({"betas": (0.9, 1.5)}, ValueError, r"betas must each be in \[0, 1\)"),
    ({"lr": math.inf}, ValueError, "lr must be a finite number"),
    ({"scale": -1.0}, ValueError, "scale .* must be a finite number > 0"),
    ({"rank": 2.5}, TypeError, "rank must be an integer"),
    ({"update_gap": 0}, ValueError, "update_gap must be >= 1"),
    ({"side": "up"}, ValueError, "side='up'"),
    ({"projector_args": {"quantizer": "int4x"}}, UnknownComponentError, "unknown quantizer 'int4x'"),
    ({"schedule": "lazy", "schedule_args": {"tresh": 0.5}}, TypeError, "'tresh'.*accepts"),
    ({"enabled": False, "eps": 0.0}, ValueError, "eps must be a finite number > 0"),  # plain AdamW too
])
def test_config_refuses_what_the_optimizer_refuses(options, error, message):
    with pytest.raises(error, match=message):
        LowRankConfig(**options)


def test_disabled_config_ignores_the_lowrank_only_options():
    """With enabled: false the projector is never built, so its options are not probed."""
    LowRankConfig(enabled=False, projector="not-installed", rank=0)


@pytest.mark.parametrize("warmup", [2.5, -1.0, math.nan, math.inf])
def test_warmup_must_be_whole_steps_or_a_fraction(warmup):
    with pytest.raises(ValueError, match="warmup must be a whole number of steps"):
        LowRankConfig(warmup=warmup)


def test_warmup_longer_than_the_run_is_refused():
    config = LowRankConfig(warmup=100)
    assert config.warmup_steps(100) == 100
    with pytest.raises(ValueError, match=r"warmup of 100 steps is longer than the run \(99 optimizer steps\); "
                                         r"set lowrank.warmup to at most 99"):
        config.warmup_steps(99)
    assert LowRankConfig(warmup=0.25).warmup_steps(99) == round(0.25 * 99)
