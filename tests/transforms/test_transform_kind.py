"""Model transforms are a component kind: registered through ``register_transforms``, named by
methods and configs as ``{name: options}``, applied and checked by one ``prepare``/``check`` pair,
the old ``weight_bits``/``gradnorm``/``compact`` spellings kept as deprecated aliases."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from lit_lowrank import build_optimizer, plugins, transforms
from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.lightning import LowRankConfig
from lit_lowrank.methods import Method
from lit_lowrank.testing import check_transform
from lit_lowrank.transforms.base import Transform, attach_store, gradient_hidden, stored_weight
from lit_lowrank.transforms.int_weights import QuantizedLinear

LIBRARY = Path(__file__).parents[2] / "lit_lowrank"
COMPONENT_PACKAGES = ("projectors", "rules", "inner", "schedules", "quantizers", "transforms")
TARGETS = ["blocks"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x)


def test_the_builtins_are_registered_through_the_hook():
    registered = plugins.registered("transforms")
    expected = {"int-weights": "int_weights", "weight-norm": "weight_norm", "compact": "compact"}
    for name, module in expected.items():
        assert registered[name].provider == f"lit_lowrank.transforms.{module}"
        assert plugins.get_transform(name).name == name


@pytest.mark.parametrize("name, options", [("int-weights", {}), ("int-weights", {"bits": 4, "group_size": 16}),
                                           ("weight-norm", {}), ("compact", {})])
def test_every_builtin_keeps_the_transform_contract(name, options):
    check_transform(plugins.get_transform(name), **options)


class Doubling(Transform):
    """Doubles the targets' weights: changes the outputs although it declares tolerance 0."""

    name = "doubling"

    def apply(self, model, targets, exclude):
        with torch.no_grad():
            for block in model.blocks:
                block[0].weight.mul_(2)
                block[0].doubled = True
        return ["blocks"]

    def applied(self, model):
        return any(getattr(block[0], "doubled", False) for block in model.blocks)


def test_check_transform_catches_a_transform_changing_the_outputs():
    with pytest.raises(AssertionError, match=r"changes the outputs by .* beyond its declared tolerance"):
        check_transform(Doubling)


def test_an_unknown_transform_or_option_is_refused_naming_the_valid_ones():
    with pytest.raises(plugins.UnknownComponentError, match=r"unknown transform 'int8'\. Registered: .*int-weights"):
        LowRankConfig(transforms={"int8": {}})
    with pytest.raises(ValueError, match=r"has no option\(s\) \['bitz'\]; its options are \['bits'"):
        LowRankConfig(transforms={"int-weights": {"bitz": 8}})


def test_two_transforms_of_the_target_layers_are_refused():
    with pytest.raises(ValueError, match="each change the target layers"):
        LowRankConfig(transforms={"int-weights": {"bits": 8}, "weight-norm": {}})


@pytest.mark.parametrize("old, new", [
    ({"weight_bits": 8, "weight_args": {"group_size": 16}}, {"int-weights": {"bits": 8, "group_size": 16}}),
    ({"gradnorm": True}, {"weight-norm": {}}),
    ({"compact": True, "projector": "random", "side": "right"}, {"compact": {}}),
])
def test_an_old_config_spelling_warns_and_trains_the_new_ones_model(old, new):
    with pytest.warns(DeprecationWarning, match=r"deprecated; write transforms="):
        config = LowRankConfig(targets=TARGETS, **old)
    rest = {key: value for key, value in old.items() if key in ("projector", "side")}
    fresh = LowRankConfig(targets=TARGETS, transforms=new, **rest)
    assert config.transforms == fresh.transforms == new
    assert (config.weight_bits, config.gradnorm, config.compact) == (None, None, None)
    old_model, new_model = config.prepare(Net()), fresh.prepare(Net())
    assert [type(m).__name__ for m in old_model.modules()] == [type(m).__name__ for m in new_model.modules()]
    for (key, a), b in zip(old_model.state_dict().items(), new_model.state_dict().values()):
        assert torch.equal(a, b), key


def test_an_old_method_spelling_warns_and_names_the_transform():
    with pytest.warns(DeprecationWarning, match=r"write transforms=\{'weight-norm': \{\}\}"):
        method = Method("weight-normalized GaLore", {}, gradnorm=True)
    assert method.transforms == {"weight-norm": {}}
    assert method.settings() == {"transforms": {"weight-norm": {}}}


def test_an_old_build_optimizer_keyword_warns_and_is_checked_like_the_new_one():
    with pytest.warns(DeprecationWarning, match="weight_bits"), pytest.raises(ValueError, match="8-bit target weights"):
        build_optimizer(Net(), targets=TARGETS, weight_bits=8, rank=2)
    model = transforms.prepare(Net(), {"int-weights": {"bits": 8}}, TARGETS)
    with pytest.warns(DeprecationWarning, match="weight_bits"):
        old = build_optimizer(model, targets=TARGETS, weight_bits=8, rank=2)
    new = build_optimizer(model, targets=TARGETS, transforms={"int-weights": {"bits": 8}}, rank=2)
    assert [g["names"] for g in old.param_groups] == [g["names"] for g in new.param_groups]


@pytest.mark.parametrize("fields", [{"transforms": {"int-weights": {"bits": 4}}}, {"transforms": {}},
                                    {"transforms": {"weight-norm": {}}}, {"weight_bits": 4}])
def test_transforms_contradicting_the_method_are_refused(fields):
    with pytest.raises(ValueError, match="contradicts method 'q-galore'"):
        LowRankConfig(method="q-galore", **fields)


def test_turning_off_the_methods_transform_with_an_old_flag_is_refused():
    with pytest.raises(ValueError, match="gradnorm=False contradicts method 'gradnorm'"):
        LowRankConfig(method="gradnorm", gradnorm=False)


def test_options_the_method_leaves_unset_are_the_users():
    config = LowRankConfig(method="q-galore", transforms={"int-weights": {"bits": 8, "group_size": 64}})
    assert config.transforms == {"int-weights": {"bits": 8, "group_size": 64}}
    assert plugins.get_method("q-galore").transforms == {"int-weights": {"bits": 8}}  # the registry's untouched


def test_prepare_applies_once_and_check_refuses_a_model_without_it():
    asked = {"int-weights": {"bits": 8, "group_size": 16}}
    model = Net()
    with pytest.raises(ValueError, match=r"8-bit target weights, but the model's targets hold float weights"):
        transforms.check(model, asked)
    transforms.prepare(model, asked, TARGETS)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 2 and all(layer.initial.group_size == 16 for layer in layers)
    transforms.prepare(model, asked, TARGETS)  # already held: nothing changes
    assert [m for m in model.modules() if isinstance(m, QuantizedLinear)] == layers
    transforms.check(model, asked)
    with pytest.raises(ValueError, match="already holds transform 'int-weights' with other options"):
        transforms.prepare(model, {"int-weights": {"bits": 4}}, TARGETS)


def test_a_transform_hiding_gradients_is_refused_with_layerwise_updates():
    with pytest.raises(ValueError, match="transform 'compact' .* set layerwise: false"):
        LowRankConfig(transforms={"compact": {}}, projector="random", side="right", layerwise=True)


def test_stored_weights_are_found_through_the_protocol():
    layer = QuantizedLinear.from_linear(nn.Linear(4, 3))
    assert stored_weight(layer.weight) is layer
    assert stored_weight(nn.Parameter(torch.zeros(2))) is None
    with pytest.raises(TypeError, match="is not a StoredWeight"):
        attach_store(nn.Parameter(torch.zeros(2)), object())


class Marking(Transform):
    """A plugin's transform that only marks the target blocks (the outputs are unchanged)."""

    name = "marking"

    def apply(self, model, targets, exclude):
        for block in model.blocks:
            block.marked = True
        return [f"blocks.{i}" for i in range(len(model.blocks))]

    def applied(self, model):
        return all(getattr(block, "marked", False) for block in model.blocks)


class MarkingPlugin:
    @hookimpl
    def register_transforms(self, register):
        register("marking", Marking)


def test_a_plugins_transform_is_named_and_applied_like_a_builtin(fresh_plugins):
    plugins.register_plugin(MarkingPlugin(), name="marking-plugin")
    config = LowRankConfig(transforms={"marking": {}}, targets=TARGETS, rank=2)
    model = config.prepare(Net())
    assert Marking().applied(model)
    optimizer = config.build(model)
    assert {n for g in optimizer.param_groups if g["lowrank"] for n in g["names"]} == {
        "blocks.0.weight", "blocks.1.weight"}


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports (``import x``, ``from x import y``, at any depth)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


@pytest.mark.parametrize("package", COMPONENT_PACKAGES)
def test_no_component_package_imports_the_optimizer(package):
    """Components sit below ``lit_lowrank.optim``: none imports it (target selection, which the
    transforms use, is the top-level ``lit_lowrank/targets.py``)."""
    for path in sorted((LIBRARY / package).rglob("*.py")):
        upward = {m for m in imported_modules(path) if m == "lit_lowrank.optim" or m.startswith("lit_lowrank.optim.")}
        assert not upward, f"{path.relative_to(LIBRARY)} imports {sorted(upward)}"


def test_a_hidden_gradient_is_marked_by_the_transform_and_cleared_by_undo():
    model = transforms.prepare(Net(), {"compact": {}}, TARGETS)
    assert [gradient_hidden(p) for p in model.parameters()] == [True, False, True, False, False, False]
    plugins.get_transform("compact")().undo(model)
    assert not any(gradient_hidden(p) for p in model.parameters())



class WholeRows(Marking):
    """A plugin's transform that needs whole weights on every rank."""

    name = "whole-rows"
    needs_whole_weights = True


class WholeRowsPlugin:
    @hookimpl
    def register_transforms(self, register):
        register("whole-rows", WholeRows)


def test_a_plugins_transform_needing_whole_weights_is_refused_under_sharded_weights(fresh_plugins):
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lit_lowrank.lightning.refusals import check_strategy

    plugins.register_plugin(WholeRowsPlugin(), name="whole-rows-plugin")
    plugins.register_plugin(MarkingPlugin(), name="marking-plugin")
    check_strategy(ModelParallelStrategy(), LowRankConfig(transforms={"marking": {}}, rank=2))  # rows suffice
    with pytest.raises(ValueError, match=r"\['whole-rows'\] cannot be combined with sharded weights"):
        check_strategy(ModelParallelStrategy(), LowRankConfig(transforms={"whole-rows": {}}, rank=2))
