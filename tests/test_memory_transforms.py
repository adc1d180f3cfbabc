"""The memory estimator reads model transforms through the Transform base class only
(``weight_bytes``, ``estimated_applied``, ``hides_gradients``): a plugin's transform is estimated
like a built-in, and a transform's own options (``int-weights``' ``group_size``) are counted."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lit_lowrank import Transform, build_optimizer, hookimpl, plugins, select_targets
from lit_lowrank import transforms as model_transforms
from lit_lowrank.memory import estimate, llama_on_meta
from lit_lowrank.methods import Method

RANK = 4


class Bf16Targets(Transform):
    """A plugin's transform storing the target weights in bfloat16 (2 bytes a value)."""

    name = "test-bf16-targets"
    changes_targets = True

    def apply(self, model, targets, exclude):
        low_rank, _ = select_targets(model, targets, exclude)
        for weight in low_rank.values():
            weight.data = weight.data.to(torch.bfloat16)
        return list(low_rank)

    def applied(self, model):
        return any(p.dtype == torch.bfloat16 for p in model.parameters())

    def weight_bytes(self, weight):
        return weight.numel() * 2


class Delta(Transform):
    """A plugin's transform adding a trainable dense delta ``D`` (zeros, the weight's shape) to
    each target linear layer, ``y = x (W + D)ᵀ + b``: new parameters, so it is estimated on a
    model holding it."""

    name = "test-delta"
    estimated_applied = True

    def apply(self, model, targets, exclude):
        low_rank, _ = select_targets(model, targets, exclude)
        for name, weight in low_rank.items():
            layer = model.get_submodule(name.rpartition(".")[0])
            layer.delta = nn.Parameter(torch.zeros_like(weight))
            layer.register_forward_hook(lambda module, inputs, output: output + F.linear(inputs[0], module.delta))
        return list(low_rank)

    def applied(self, model):
        return any(hasattr(module, "delta") for module in model.modules())


METHODS = {"test-bf16-galore": Method("GaLore over bfloat16 targets", {}, transforms={"test-bf16-targets": {}}),
           "test-delta-galore": Method("GaLore with dense deltas", {}, transforms={"test-delta": {}})}


@pytest.fixture(autouse=True)
def test_plugin():
    """The transforms and methods above, registered through the hooks as a plugin's would be."""

    class Plugin:
        @hookimpl
        def register_transforms(self, register):
            register(Bf16Targets.name, Bf16Targets)
            register(Delta.name, Delta)

        @hookimpl
        def register_methods(self, register):
            for name, recipe in METHODS.items():
                register(name, recipe)

    plugins.register_plugin(Plugin(), name="memory-transforms-test-plugin")
    yield
    plugins.unregister_plugin("memory-transforms-test-plugin")


class Blocks(nn.Module):
    """Target linear layers of 37×53, 129×37 and 300×129 (sizes filling no group of 64 or 256
    exactly) and a dense head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mlp = nn.Sequential(nn.Linear(53, 37), nn.Linear(37, 129), nn.Linear(129, 300))
        self.head = nn.Linear(300, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(x))


def stored_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers hold now (each storage once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values())


def estimated(model: nn.Module, name: str | Method):
    return estimate(model, name, rank=RANK, targets=["mlp"], exclude=["head"])


def test_a_plugin_transforms_weight_bytes_are_the_stored_ones():
    estimate_of_plain = estimated(Blocks(), "test-bf16-galore")
    held = model_transforms.prepare(Blocks(), {"test-bf16-targets": {}}, ["mlp"], ["head"])
    assert estimate_of_plain.weights == stored_bytes(held)


@pytest.mark.parametrize("group_size", [64, -1])
def test_int_weights_are_counted_with_their_own_group_size(group_size):
    recipe = Method("GaLore over INT8 weights", {}, transforms={"int-weights": {"bits": 8, "group_size": group_size}})
    estimate_of_plain = estimated(Blocks(), recipe)
    held = model_transforms.prepare(Blocks(), recipe.transforms, ["mlp"], ["head"])
    placeholders = sum(p.untyped_storage().nbytes() for p in held.parameters() if hasattr(p, "weight_store"))
    assert estimate_of_plain.weights == stored_bytes(held) - placeholders


def test_a_transform_estimated_applied_is_refused_on_a_model_without_it():
    with pytest.raises(ValueError, match=r"'test-delta-galore' trains targets transformed by 'test-delta'.*"
                                         r"transforms\.prepare"):
        estimated(Blocks(), "test-delta-galore")


def test_a_model_holding_the_plugin_transform_is_estimated_as_measured():
    model = model_transforms.prepare(Blocks(), {"test-delta": {}}, ["mlp"], ["head"])
    predicted = estimated(model, "test-delta-galore")
    optimizer = build_optimizer(model, method="test-delta-galore", targets=["mlp"], exclude=["head"], rank=RANK)
    model(torch.randn(4, 53)).square().mean().backward()
    optimizer.step()
    assert predicted.weights == stored_bytes(model)
    assert predicted.gradients == sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    assert predicted.states == optimizer.state_bytes()


def test_the_script_estimates_a_plugin_method_on_a_model_holding_its_transform(monkeypatch, capsys):
    script = Path(__file__).parents[1] / "scripts" / "estimate_memory.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--size", "60m", "--methods", "test-delta-galore"])
    runpy.run_path(str(script), run_name="__main__")
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| test-delta-galore"))
    plain = llama_on_meta("60m")
    low_rank, _ = select_targets(plain)
    deltas = sum(weight.numel() for weight in low_rank.values())  # one value per target weight's
    bf16_bytes = 2 * (sum(p.numel() for p in plain.parameters()) + deltas)  # every parameter trains
    weights, gradients = (float(cell) for cell in row.split("|")[2:4])
    assert (weights, gradients) == (round(bf16_bytes / 2**30, 2),) * 2
