"""Model transforms and tied weights: INT8 weights (Q-GaLore), weight norm (GradNormLoRP) and
CompAct refuse a target whose weight another module shares, on every path that applies them,
before changing the model, with an ``exclude`` that works; a layer registered under two names
is transformed as one layer; a quantized layer keeps its bias parameter, tied or not."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from lit_lowrank import build_optimizer
from lit_lowrank.transforms.compact import CompactLinear, bind_compact, compact_linear_layers
from lit_lowrank.lightning import LowRankConfig
from lit_lowrank.lightning.adoption import adopt_module
from lit_lowrank.transforms.int_weights import QuantizedLinear, quantize_linear_weights
from lit_lowrank.transforms.weight_norm import apply_gradnorm, is_gradnorm

WIDTH = 8
TRANSFORMS = {
    "weight_bits": lambda model, exclude=(): quantize_linear_weights(model, exclude=exclude, group_size=16),
    "gradnorm": lambda model, exclude=(): apply_gradnorm(model, None, exclude),
    "compact": lambda model, exclude=(): compact_linear_layers(model, exclude=exclude),
}
CONFIGS = {  # the Lightning config's fields that apply each transform
    "weight_bits": dict(weight_bits=8, weight_args={"group_size": 16}),
    "gradnorm": dict(gradnorm=True),
    "compact": dict(compact=True, projector="random", side="right"),
}


class Holder(nn.Module):
    """A module that uses another module's weight under its own name (``matrix``)."""

    def __init__(self, matrix: nn.Parameter) -> None:
        super().__init__()
        self.matrix = matrix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix


class Block(nn.Module):
    """``c(b(relu(a(x))))``, with ``b`` tied to ``a`` (``tie="linear"``), or ``a``'s weight also
    used by a :class:`Holder` (``tie="holder"``), or ``a`` called again as ``again``
    (``tie="reuse"``: one module under two names)."""

    def __init__(self, tie: str) -> None:
        super().__init__()
        self.a, self.b, self.c = (nn.Linear(WIDTH, WIDTH) for _ in range(3))
        if tie == "linear":
            self.b.weight = self.a.weight
        elif tie == "holder":
            self.holder = Holder(self.a.weight)
        elif tie == "reuse":
            self.again = self.a
        self.tie = tie

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.a(x))
        if self.tie == "holder":
            hidden = hidden + self.holder(x)
        if self.tie == "reuse":
            hidden = torch.relu(self.again(hidden))
        return self.c(self.b(hidden))


def model_with(tie: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleList([Block(tie)])


def transformed_modules(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules()
            if isinstance(module, (QuantizedLinear, CompactLinear)) or is_gradnorm(module)]


def tied_error(apply) -> str:
    with pytest.raises(ValueError, match=r"0\.a, whose weight is tied to") as caught:
        apply()
    return str(caught.value)


@pytest.mark.parametrize("tie, other", [("linear", "0.b.weight"), ("holder", "0.holder.matrix")])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_a_tied_target_is_refused_before_the_model_changes(transform, tie, other):
    model = model_with(tie)
    message = tied_error(lambda: TRANSFORMS[transform](model))
    assert other in message and "exclude" in message and "untie" in message
    assert transformed_modules(model) == [] and model[0].a.weight is model[0].get_parameter(other.partition(".")[2])


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_the_exclude_the_error_names_leaves_the_shared_weight_dense_and_tied(transform):
    model = model_with("linear")
    pattern = re.search(r"exclude: \['(.+?)'\]", tied_error(lambda: TRANSFORMS[transform](model))).group(1)
    TRANSFORMS[transform](model, exclude=[pattern])
    assert transformed_modules(model) == ["0.c"]
    assert model[0].a.weight is model[0].b.weight
    low_rank = {id(p) for group in build_optimizer(model, rank=2, exclude=[pattern]).param_groups if group["lowrank"]
                for p in group["params"]}
    assert id(model[0].a.weight) not in low_rank


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_the_lightning_config_refuses_a_tied_target(transform):
    config = LowRankConfig(rank=2, **CONFIGS[transform])
    model = model_with("linear")
    tied_error(lambda: config.prepare(model))
    assert transformed_modules(model) == []


@pytest.mark.parametrize("transform", ["weight_bits", "compact"])
def test_adopting_a_users_module_refuses_a_tied_target(transform):
    config = LowRankConfig(rank=2, **CONFIGS[transform])
    model = model_with("linear")
    tied_error(lambda: adopt_module(model, config))
    assert transformed_modules(model) == []


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_a_layer_under_two_names_is_transformed_as_one(transform):
    model = model_with("reuse")
    TRANSFORMS[transform](model)
    assert model[0].a is model[0].again and {"0.a", "0.b", "0.c"} <= set(transformed_modules(model))


def test_a_reused_quantized_layer_gets_the_gradient_of_both_calls():
    model = model_with("reuse")
    quantize_linear_weights(model, group_size=16)
    reference = model_with("reuse")  # float layers holding the dequantized weights
    for name in ("a", "b", "c"):
        getattr(reference[0], name).weight.data.copy_(getattr(model[0], name).dequantized())
    x = torch.randn(5, WIDTH)
    model[0](x).square().sum().backward()
    reference[0](x).square().sum().backward()
    torch.testing.assert_close(model[0].a.weight.grad, reference[0].a.weight.grad)


def test_a_reused_compact_layer_steps_like_galore_from_both_calls():
    """SGD on the same random right projection: CompAct from the R of both calls of the reused
    layer equals GaLore from its full gradient."""
    options = dict(projector="random", side="right", rank=2, update_gap=2, lr=0.1, inner="sgd")
    reference, model = model_with("reuse"), model_with("reuse")
    compact_linear_layers(model)
    reference_optimizer, optimizer = build_optimizer(reference, **options), build_optimizer(model, **options)
    bind_compact(model, optimizer)
    for step in range(3):
        x = torch.randn(5, WIDTH, generator=torch.Generator().manual_seed(step))
        for net, opt in ((reference, reference_optimizer), (model, optimizer)):
            net[0](x).square().sum().backward()
            opt.step()
            opt.zero_grad()
    assert not torch.equal(model[0].a.weight, model_with("reuse")[0].a.weight)
    for (name, mine), want in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(mine, want, rtol=1e-5, atol=1e-6, msg=name)


def test_a_quantized_layer_keeps_its_bias_parameter_and_a_bias_tie():
    model = model_with("none")
    model[0].b.bias = model[0].a.bias
    biases = {name: getattr(model[0], name).bias for name in ("a", "b", "c")}
    quantize_linear_weights(model, group_size=16)
    assert all(getattr(model[0], name).bias is bias for name, bias in biases.items())
    optimizer = build_optimizer(model, rank=2, lr=0.1)
    model[0](torch.randn(5, WIDTH)).square().sum().backward()
    optimizer.step()
    assert model[0].a.bias is model[0].b.bias and not torch.equal(model[0].a.bias, model_with("none")[0].a.bias)
