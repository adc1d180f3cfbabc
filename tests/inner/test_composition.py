"""Every registered inner optimizer composes with every registered projector and update rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_lowrank import LowRankOptimizer, plugins


@pytest.mark.parametrize("inner", sorted(plugins.registered("inner_optimizers")))
@pytest.mark.parametrize("rule", list(plugins.registered("update_rules")))
@pytest.mark.parametrize("projector", list(plugins.registered("projectors")))
def test_inner_steps_with_projector_and_rule(inner, rule, projector):
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(24, 16))
    start = weight.detach().clone()
    tensors = plugins.get_projector(projector).projects_tensors  # a core: no sides, no rotation maps
    options = dict(lr=1e-2, projector=projector, rule=rule, inner=inner, rank=1 if rule == "apollo-mini" else 4,
                   update_gap=2, on_refresh="keep" if tensors else "rotate")
    groups = [{"params": [weight], "lowrank": True}]
    if tensors and not (plugins.get_update_rule(rule).any_projection and plugins.get_inner_optimizer(inner).batched):
        with pytest.raises(ValueError, match="projects tensors"):
            LowRankOptimizer(groups, **options)
        return
    optimizer = LowRankOptimizer(groups, **options)
    fresh = plugins.get_inner_optimizer(inner)().init_state(torch.zeros(24, 4))
    for _ in range(3):
        weight.grad = torch.randn(24, 16)
        optimizer.step()
    assert torch.isfinite(weight).all()
    assert not torch.equal(weight.detach(), start)
    assert set(fresh) <= set(optimizer.state[weight])
