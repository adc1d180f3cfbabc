"""The norm-growth limiter and the norm ratios at the edges: an all-zero gradient must not
switch the limiter off, and half-precision weights must not turn the 1e-8 guard into 0/0."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_lowrank import LowRankOptimizer
from lit_lowrank.projectors.svd import SVDProjector
from lit_lowrank.rules.apollo import ApolloMiniRule, ApolloRule
from lit_lowrank.rules.base import RuleInputs
from lit_lowrank.rules.fira import FiraRule

RULES = {"fira": lambda: FiraRule(scale=0.25), "apollo": lambda: ApolloRule(scale=1.0),
         "apollo-mini": lambda: ApolloMiniRule()}


def _updates(rule, grads, rank):
    """The update each gradient produces, with ``N = 2R`` (a stand-in inner optimizer) and one
    fixed SVD basis, so that only the limiter's history carries over between steps."""
    projector = SVDProjector(rank, side="right")
    projector.refresh(torch.randn(12, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    state, updates = {}, []
    for grad in grads:
        low = projector.project(grad)
        param = torch.zeros_like(grad)
        rule.apply_(param, RuleInputs(grad, low, 2 * low, projector, state), step_size=1.0)
        updates.append(param)
    return updates


@pytest.mark.parametrize("name", list(RULES))
def test_an_all_zero_gradient_leaves_the_limiter_history_alone(name):
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randn(12, 7, dtype=torch.float64, generator=generator) for _ in range(2))
    rank = 1 if name == "apollo-mini" else 3
    with_zero = _updates(RULES[name](), [first, torch.zeros_like(first), 5 * second], rank)
    skipped = _updates(RULES[name](), [first, 5 * second], rank)
    assert with_zero[1].abs().max() == 0
    torch.testing.assert_close(with_zero[2], skipped[1], rtol=1e-12, atol=0)
    assert with_zero[2].norm() > 0.5 * skipped[1].norm()  # limited to γ·‖first‖, not to γ·1e-8


@pytest.mark.parametrize("name", list(RULES))
def test_a_zero_first_gradient_limits_nothing(name):
    grad = torch.randn(12, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rank = 1 if name == "apollo-mini" else 3
    after_zero = _updates(RULES[name](), [torch.zeros_like(grad), grad], rank)[1]
    torch.testing.assert_close(after_zero, _updates(RULES[name](), [grad], rank)[0], rtol=1e-12, atol=0)


def _train(rule, dtype, rule_args=None):
    """A 16×24 weight trained 6 steps; the gradient's last 8 columns are zero: in fp16 the ε
    guard 1e-8 rounds to 0 and such a channel gives ‖N‖/‖R‖ = 0/0."""
    generator = torch.Generator().manual_seed(2)
    start = torch.randn(16, 24, generator=generator)
    grads = [torch.randn(16, 24, generator=generator) for _ in range(6)]
    for grad in grads:
        grad[:, 16:] = 0
    weight = nn.Parameter(start.to(dtype))
    rank = 1 if rule == "apollo-mini" else 4
    optimizer = LowRankOptimizer([{"params": [weight], "lowrank": True}], lr=1e-2, rank=rank, rule=rule,
                                 projector="random" if rule.startswith("apollo") else "svd", side="left",
                                 rule_args=rule_args or {})
    for grad in grads:
        weight.grad = grad.to(dtype)
        optimizer.step()
    return weight.detach()


@pytest.mark.parametrize("rule", ["fira", "apollo", "apollo-mini"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_stay_finite_and_follow_float32(rule, dtype):
    half, single = _train(rule, dtype), _train(rule, torch.float32)
    assert torch.isfinite(half).all()
    # fp16 / bf16 round the weight (|w| ≤ 4) to ~2e-3 / ~2e-2 at every step
    torch.testing.assert_close(half.float(), single, rtol=0, atol=3e-2 if dtype == torch.bfloat16 else 4e-3)
