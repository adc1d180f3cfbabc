"""The option schema is the one list of options: the optimizer's keywords and defaults, the YAML
fields and their help, and the lists derived from it agree with it; one resolution serves
``build_optimizer`` and the YAML config alike."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from torch import nn

from lit_lowrank import LowRankOptimizer, build_optimizer
from lit_lowrank.lightning import LowRankConfig
from lit_lowrank.methods import DEFINING, OPTION_KEYS, TRANSFORMS_KEY
from lit_lowrank.optim import checkpoint
from lit_lowrank.optim.resolution import resolve
from lit_lowrank.options import ROLES, defaults, having, names


def test_the_optimizers_keywords_and_defaults_are_the_schemas():
    signature = inspect.signature(LowRankOptimizer).parameters
    keywords = [name for name in signature if name not in ("params", "is_target")]
    assert keywords == list(names())
    for name, default in defaults().items():
        assert signature[name].default in (default, None if default == {} else default), name


def test_every_option_is_a_yaml_field_documented_for_help():
    fields = {f.name for f in dataclasses.fields(LowRankConfig)}
    assert set(names()) | {TRANSFORMS_KEY} <= fields
    documented = inspect.getdoc(LowRankConfig)
    for name in (*names(), TRANSFORMS_KEY):
        assert f"\n    {name}:" in documented or f"\n{name}:" in documented or f"    {name}: " in documented, name


def test_derived_lists_follow_the_roles():
    assert OPTION_KEYS == having("method")
    assert set(DEFINING) == set(having("defining")) | {TRANSFORMS_KEY}
    assert checkpoint.STATE_LAYOUT == having("state")
    assert set(checkpoint.DENSE_OPTIONS) == set(having("dense")) - {"lr"}
    assert set(having("defining")) <= set(having("method")) and set(having("user")) <= set(having("dense"))
    with pytest.raises(ValueError, match="unknown role"):
        having("tunable")
    assert ROLES


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2)], nn.Linear(8, 2))


@pytest.mark.parametrize("method", [None, "galore"])
def test_an_explicit_none_of_an_option_that_means_something_is_kept(method):
    """``max_consecutive_skips=None`` (no bound) is the user's value, not an unset one."""
    optimizer = build_optimizer(net(), method=method, rank=2, max_consecutive_skips=None)
    assert {group["max_consecutive_skips"] for group in optimizer.param_groups} == {None}


def test_the_yaml_config_and_build_optimizer_resolve_a_method_alike():
    config = LowRankConfig(method="q-galore", rank=4, scale=0.5)
    run = resolve("q-galore", {"rank": 4, "scale": 0.5})
    assert {name: getattr(config, name) for name in (*OPTION_KEYS, TRANSFORMS_KEY)} == {
        **{name: run.options[name] for name in OPTION_KEYS}, TRANSFORMS_KEY: run.transforms}
    assert {"rank", "scale", "inner", "schedule", "projector_args", TRANSFORMS_KEY} <= run.chosen
    assert "rule" not in run.chosen


def test_an_unknown_option_names_the_options():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['rnak'\]; the options are \['lr'"):
        resolve(None, {"rnak": 4})


def test_an_option_contradicting_the_method_is_refused_on_every_path():
    with pytest.raises(ValueError, match="inner='adamw' contradicts method 'galore-lion'"):
        resolve("galore-lion", {"inner": "adamw"})
    with pytest.raises(ValueError, match="inner='adamw' contradicts method 'galore-lion'"):
        build_optimizer(net(), method="galore-lion", inner="adamw")
    with pytest.raises(ValueError, match="inner='adamw' contradicts method 'galore-lion'"):
        LowRankConfig(method="galore-lion", inner="adamw")
