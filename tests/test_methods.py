"""Named methods: one registry (``register_methods``) read by ``build_optimizer(method=...)``,
``lowrank: {method: ...}``, the estimator, the benchmark and the generated methods reference
(``docs/hooks/generate.py``)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from lit_lowrank import UnknownComponentError, build_optimizer, hookimpl, plugins
from lit_lowrank.lightning import LowRankConfig
from lit_lowrank.transforms.compact import compact_linear_layers
from lit_lowrank.methods import BUILTIN_METHODS, OPTION_KEYS, Method
from lit_lowrank.transforms.int_weights import quantize_linear_weights
from lit_lowrank.transforms.weight_norm import apply_gradnorm

GENERATOR = Path(__file__).parents[1] / "docs" / "hooks" / "generate.py"


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 16)) for _ in range(2))
        self.head = nn.Linear(16, 3)


def prepared(method: Method) -> Blocks:
    model = Blocks()
    if "weight-norm" in method.transforms:
        apply_gradnorm(model)
    if "int-weights" in method.transforms:
        quantize_linear_weights(model, None, bits=method.transforms["int-weights"]["bits"])
    if "compact" in method.transforms:
        compact_linear_layers(model)
    return model


def comparable(group: dict) -> dict:
    return {key: value for key, value in group.items() if key != "params"}


@pytest.mark.parametrize("name", sorted(BUILTIN_METHODS))
def test_a_method_builds_what_its_explicit_options_build(name):
    method = plugins.get_method(name)
    by_name = build_optimizer(prepared(method), method=name, lr=0.003)
    explicit = build_optimizer(prepared(method), lr=0.003, **method.options)
    assert [comparable(g) for g in by_name.param_groups] == [comparable(g) for g in explicit.param_groups]
    for key, value in method.options.items():
        assert by_name.param_groups[0][key] == value


def test_explicit_options_tune_a_method_with_a_warning():
    with pytest.warns(UserWarning, match="scale=0.5 replaces method 'apollo''s scale=1.0"):
        optimizer = build_optimizer(Blocks(), method="apollo", scale=0.5, rank=4)
    group = optimizer.param_groups[0]
    assert (group["projector"], group["rule"], group["scale"], group["rank"]) == ("random", "apollo", 0.5, 4)


@pytest.mark.parametrize("method, key, value", [("apollo", "projector", "svd"), ("fira", "rule", "galore"),
                                                ("galore-8bit", "inner", "adamw")])
def test_an_option_that_makes_another_method_is_refused(method, key, value):
    with pytest.raises(ValueError, match=f"{key}='{value}' contradicts method '{method}'"):
        build_optimizer(Blocks(), method=method, **{key: value})
    with pytest.raises(ValueError, match=f"{key}='{value}' contradicts method '{method}'"):
        LowRankConfig(method=method, **{key: value})


def test_a_component_the_method_leaves_open_composes():
    group = build_optimizer(Blocks(), method="apollo", inner="lion").param_groups[0]  # APOLLO with Lion
    assert (group["rule"], group["inner"]) == ("apollo", "lion")


def test_every_builtin_is_registered_through_the_hook():
    registered = plugins.registered("methods")
    for name, method in BUILTIN_METHODS.items():
        assert registered[name].component is method
        assert registered[name].provider == "lit_lowrank.methods"


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(UnknownComponentError, match=r"unknown method 'firra'\. Registered: .*fira"):
        build_optimizer(Blocks(), method="firra")


@pytest.mark.parametrize("name, fix", [("q-galore", "quantize_linear_weights"), ("gradnorm", "apply_gradnorm")])
def test_a_model_without_the_methods_transform_is_refused(name, fix):
    with pytest.raises(ValueError, match=fix):
        build_optimizer(Blocks(), method=name)


def test_a_method_sets_only_method_options():
    with pytest.raises(ValueError, match=r"not \['lr'\]"):
        Method("with a learning rate", {"rule": "fira", "lr": 0.1})


def test_a_plugin_ships_a_recipe_usable_by_name_everywhere():
    recipe = Method("Fira over the DCT basis", {"rule": "fira", "projector": "dct", "rule_args": {"gamma": 1.02}})

    class Plugin:
        @hookimpl
        def register_methods(self, register):
            register("fira-dct", recipe)

    plugins.register_plugin(Plugin(), name="fira-dct-recipe")
    try:
        group = build_optimizer(Blocks(), method="fira-dct").param_groups[0]
        assert (group["rule"], group["projector"], group["rule_args"]) == ("fira", "dct", {"gamma": 1.02})
        config = LowRankConfig(method="fira-dct")
        assert (config.rule, config.projector, config.rule_args) == ("fira", "dct", {"gamma": 1.02})
    finally:
        plugins.unregister_plugin("fira-dct-recipe")


def test_config_method_fills_only_fields_left_unset():
    config = LowRankConfig(method="q-galore", scale=0.5)  # q-galore sets no scale: no warning
    assert (config.inner, config.schedule, config.transforms, config.scale, config.rank) == (
        "adamw8bit", "lazy", {"int-weights": {"bits": 8}}, 0.5, 128)
    assert config.projector_args == {"quantizer": "int", "quantizer_args": {"bits": 4, "group_size": 256}}
    # set explicitly to the method's own value: no contradiction
    assert LowRankConfig(method="apollo", projector="random", scale=1).projector == "random"
    config.projector_args["quantizer_args"]["bits"] = 2  # a config's copy, never the registry's
    assert plugins.get_method("q-galore").options["projector_args"]["quantizer_args"]["bits"] == 4


def test_config_without_method_keeps_the_defaults():
    config = LowRankConfig()
    assert (config.projector, config.rule, config.inner, config.rank, config.scale, config.transforms) == (
        "svd", "galore", "adamw", 128, 0.25, None)


def test_config_method_trains_like_build_optimizer_method():
    config = LowRankConfig(method="fira", rank=4, lr=0.002)
    model = Blocks()
    built = config.build(model)
    reference = build_optimizer(Blocks(), method="fira", rank=4, lr=0.002, nonfinite="skip")
    assert [comparable(g) for g in built.param_groups] == [comparable(g) for g in reference.param_groups]


def docs_generator():
    """The docs site's generator module (it is not a package: loaded from its path)."""
    spec = importlib.util.spec_from_file_location("docs_generate", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def methods_page_rows() -> dict[str, str]:
    """The generated methods reference: method name → the settings it documents (YAML flow keys)."""
    reference = docs_generator().methods_reference()
    sections = re.findall(r"^### ([\w-]+)\n(.*?)(?=^### |\Z)", reference, flags=re.MULTILINE | re.DOTALL)
    rows = {}
    for name, body in sections:
        sets = re.search(r"\*\*Sets\*\* \(`lowrank: \{method: [\w-]+\}`\): `([^`]*)`", body)
        rows[name] = sets.group(1) if sets else None
    return rows


def test_methods_reference_has_every_builtin_with_its_settings():
    rows = methods_page_rows()
    assert set(BUILTIN_METHODS) <= set(rows), sorted(set(BUILTIN_METHODS) - set(rows))
    for name, spelled in rows.items():
        assert spelled is not None, f"{name}: no settings line"
        settings = {} if spelled == "the defaults" else yaml.safe_load("{" + spelled + "}")
        expected = json.loads(json.dumps(plugins.get_method(name).settings()))  # tuples as YAML's lists
        assert settings == expected, name
    assert set(OPTION_KEYS) <= set(LowRankConfig.__dataclass_fields__)


def test_a_method_that_is_not_a_method_object_is_skipped_with_a_warning():
    class Plugin:
        @hookimpl
        def register_methods(self, register):
            register("dict-recipe", {"rule": "fira"})

    with pytest.warns(RuntimeWarning, match="not a lit_lowrank.Method; its methods are skipped"):
        plugins.register_plugin(Plugin(), name="dict-recipe")
        names = set(plugins.registered("methods"))
    try:
        assert "dict-recipe" not in names and "fira" in names
    finally:
        plugins.unregister_plugin("dict-recipe")
