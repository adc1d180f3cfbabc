"""Stacked expert weights (transformers' fused MoE experts, E×m×n): projected per expert in one
batched step, checked against the same experts trained as separate 2-D weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM

from lit_lowrank import LowRankOptimizer, build_optimizer

EXPERTS, RANK, GAP = 4, 3, 3


def tiny_mixtral() -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=EXPERTS,
                           num_experts_per_tok=2, max_position_embeddings=32)
    return MixtralForCausalLM(config)


def expert_stacks(model: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in model.named_parameters() if name.endswith(("experts.gate_up_proj", "experts.down_proj"))]


def backward(model: MixtralForCausalLM, step: int) -> None:
    tokens = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(step))
    model(input_ids=tokens, labels=tokens).loss.backward()


OPTIONS = dict(lr=1e-2, weight_decay=0.01, rank=RANK, update_gap=GAP, scale=0.5)


@pytest.mark.parametrize("rule, rule_args, on_refresh", [
    ("galore", {}, "keep"), ("galore", {}, "rotate"), ("fira", {}, "keep"), ("apollo", {"scaling": "tensor"}, "keep"),
])
def test_a_stack_trains_like_its_experts_as_separate_matrices(rule, rule_args, on_refresh):
    model = tiny_mixtral()
    options = dict(OPTIONS, rule=rule, rule_args=rule_args, on_refresh=on_refresh)
    stacked = build_optimizer(model, targets=["experts"], **options)
    assert [g.get("layout") for g in stacked.param_groups if g["lowrank"]] == ["experts"]
    stacks = expert_stacks(model)
    separate = [nn.Parameter(stack.detach()[e].clone()) for stack in stacks for e in range(EXPERTS)]
    reference = LowRankOptimizer([{"params": separate, "lowrank": True}], **options)
    for step in range(3 * GAP + 1):  # four refreshes
        backward(model, step)
        for index, p in enumerate(separate):
            p.grad = stacks[index // EXPERTS].grad[index % EXPERTS].clone()
        stacked.step(), reference.step()
        stacked.zero_grad(), reference.zero_grad()
    for index, p in enumerate(separate):
        torch.testing.assert_close(stacks[index // EXPERTS][index % EXPERTS], p, rtol=1e-5, atol=1e-6)
    assert next(iter(stacked.projectors.values())).refreshes == 4


def test_stack_state_bytes_follow_the_formula():
    model = tiny_mixtral()
    optimizer = build_optimizer(model, targets=["experts"], **OPTIONS)
    backward(model, 0)
    optimizer.step()
    expected_moments = expected_basis = 0
    for stack in expert_stacks(model):
        count, m, n = stack.shape
        b = stack.element_size()
        expected_moments += count * 2 * RANK * max(m, n) * b  # E · 2 · r · max(m, n) · b
        expected_basis += count * RANK * min(m, n) * b  # E · r · min(m, n) · b
    sizes = optimizer.state_bytes()
    assert (sizes["moments"], sizes["projectors"]) == (expected_moments, expected_basis)


def test_a_stack_resumes_exactly():
    model = tiny_mixtral()
    optimizer = build_optimizer(model, targets=["experts"], rule="fira", **OPTIONS)
    for step in range(GAP + 1):
        backward(model, step)
        optimizer.step(), optimizer.zero_grad()
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    for step in range(GAP + 1, 3 * GAP):
        backward(model, step)
        optimizer.step(), optimizer.zero_grad()

    resumed = tiny_mixtral()
    resumed.load_state_dict(saved_model)
    resumed_optimizer = build_optimizer(resumed, targets=["experts"], rule="fira", **OPTIONS)
    resumed_optimizer.load_state_dict(saved_optimizer)
    for step in range(GAP + 1, 3 * GAP):
        backward(resumed, step)
        resumed_optimizer.step(), resumed_optimizer.zero_grad()
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_a_checkpoint_of_other_stacks_is_refused():
    model = tiny_mixtral()
    optimizer = build_optimizer(model, targets=["experts"], **OPTIONS)
    backward(model, 0)
    optimizer.step()
    state = optimizer.state_dict()
    other = build_optimizer(tiny_mixtral(), targets=["experts"], **{**OPTIONS, "rank": RANK + 1})
    with pytest.raises(ValueError, match="rank"):
        other.load_state_dict(state)


@pytest.mark.parametrize("options, message", [
    ({"projector": "dct"}, r"batched projector, and .*dct.* is not; set projector to one of \[.*'svd'"),
    ({"inner": "adafactor"}, r"batched inner, and .*adafactor.* is not"),
    ({"projector_args": {"quantizer": "int", "quantizer_args": {"bits": 4}}}, "quantized projector bases"),
])
def test_components_that_cannot_take_a_stack_are_refused_when_built(options, message):
    with pytest.raises(ValueError, match=message):
        build_optimizer(tiny_mixtral(), targets=["experts"], **{**OPTIONS, **options})


def test_a_3d_weight_without_a_layout_is_refused_naming_both():
    with pytest.raises(ValueError, match="layout: experts .*or kernel .*Conv1d kernel is 3-D too"):
        LowRankOptimizer([{"params": [nn.Parameter(torch.zeros(2, 3, 4))], "lowrank": True}])


def test_apollo_on_a_stack_shares_one_random_projection_and_matches_each_expert_alone():
    model = tiny_mixtral()
    stack = expert_stacks(model)[0]
    options = dict(OPTIONS, projector="random", rule="apollo")
    stacked = LowRankOptimizer([{"params": [stack], "lowrank": True, "layout": "experts"}], **options)
    alone = [nn.Parameter(stack.detach()[e].clone()) for e in range(EXPERTS)]
    references = [LowRankOptimizer([{"params": [p], "lowrank": True}], **options) for p in alone]  # seed 0 each
    for step in range(GAP + 2):
        backward(model, step)
        for e, (p, reference) in enumerate(zip(alone, references)):
            p.grad = stack.grad[e].clone()
            reference.step()
        stacked.step()
        model.zero_grad()
    for e, p in enumerate(alone):
        torch.testing.assert_close(stack[e], p, rtol=1e-5, atol=1e-6)
    m, n = stack.shape[1:]
    # one shared draw (the cached r·min(m, n) basis) and its checkpointed int64 shape (m, n)
    assert stacked.state_bytes()["projectors"] == RANK * min(m, n) * stack.element_size() + 2 * 8
