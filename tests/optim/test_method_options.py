"""Every option given with a method is used or refused: a model transform asked of
``build_optimizer`` by keyword must be on the model, and ``betas`` with ``galore-lion`` reach Lion."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_lowrank import build_optimizer
from lit_lowrank.transforms.compact import compact_linear_layers
from lit_lowrank.transforms.int_weights import quantize_linear_weights
from lit_lowrank.transforms.weight_norm import apply_gradnorm


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2)], nn.Linear(8, 2))


TRANSFORMS = {
    "gradnorm": ({"gradnorm": True}, apply_gradnorm, "weight-normalized"),
    "weight_bits": ({"weight_bits": 8}, lambda model: quantize_linear_weights(model, bits=8), "8-bit target weights"),
    "compact": ({"compact": True}, compact_linear_layers, "compressed linear layers"),
}


@pytest.mark.parametrize("method", [None, "galore"])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_a_transform_asked_by_keyword_is_refused_on_a_model_without_it(transform, method):
    options, _, named = TRANSFORMS[transform]
    with pytest.raises(ValueError, match=named):
        build_optimizer(net(), method=method, rank=2, **options)


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_a_transform_asked_by_keyword_builds_on_a_model_holding_it(transform):
    options, apply, _ = TRANSFORMS[transform]
    model = net()
    apply(model)
    optimizer = build_optimizer(model, method="galore", rank=2, **options)
    assert not any(key in group for group in optimizer.param_groups for key in options)


def test_weight_bits_of_another_width_than_the_models_is_refused():
    model = net()
    quantize_linear_weights(model, bits=4)
    with pytest.raises(ValueError, match=r"8-bit target weights, but the model's targets hold \[4\]"):
        build_optimizer(model, weight_bits=8, rank=2)


@pytest.mark.parametrize("betas", [None, (0.8, 0.9)])
def test_galore_lion_uses_the_betas_its_groups_show(betas):
    """Lion's own (0.9, 0.99) when betas is unset; the user's betas when set — on every group."""
    optimizer = build_optimizer(net(), method="galore-lion", rank=2, betas=betas)
    for group in optimizer.param_groups:
        if group["lowrank"]:
            inner = optimizer._group_components(group)[0]
            assert inner.betas == group["betas"] == (betas or (0.9, 0.99))
