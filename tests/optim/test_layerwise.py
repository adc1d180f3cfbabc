"""Layer-wise updates: the same trajectory as the standard mode (also with gradient
accumulation, where only projections are summed), accumulator sizes, and the backward-peak
memory saving measured by the allocator against the gradient bytes computed from the shapes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lit_lowrank import build_optimizer
from lit_lowrank.models import Llama, Mixtral
from lit_lowrank.optim.factory import DEFAULT_EXCLUDE, DEFAULT_TARGETS
from lit_lowrank.optim.layerwise import LayerwiseUpdates
from lit_lowrank.transforms.int_weights import quantize_linear_weights
from lit_lowrank.transforms.weight_norm import apply_gradnorm

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SMALL = dict(hidden_size=32, intermediate_size=64, num_heads=2, num_layers=2)
RANK = 4


def small_llama(dtype=torch.float32, transform=None) -> Llama:
    torch.manual_seed(0)
    model = Llama("tiny", vocab_size=64, **SMALL).to(dtype)
    if transform is not None:
        transform(model)
    return model


def batches(count):
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (2, 12), generator=generator) for _ in range(count)]


def train(model, *, layerwise, accumulation, steps=3, **options):
    """``steps`` optimizer steps of ``accumulation`` micro-batches, loss / accumulation as
    Lightning does; the LR scheduler steps once per optimizer step in both modes."""
    optimizer = build_optimizer(model, rank=RANK, update_gap=2, lr=1e-2, weight_decay=0.1, **options)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    updates = LayerwiseUpdates(optimizer, accumulation).attach() if layerwise else None
    data = iter(batches(steps * accumulation))
    for _ in range(steps):
        for _ in range(accumulation):
            tokens = next(data)
            (model(tokens, labels=tokens).loss / accumulation).backward()
        optimizer.step()  # a no-op in layer-wise mode: the hooks stepped and freed every gradient
        optimizer.zero_grad()
        scheduler.step()
    assert all(p.grad is None for p in model.parameters())
    return {name: p.detach().clone() for name, p in model.named_parameters()}, optimizer, updates


@pytest.mark.parametrize("rule, inner", [("galore", "adamw"), ("galore", "adafactor"), ("fira", "adamw")])
def test_layerwise_trajectory_is_bitwise_standard(rule, inner):
    """One micro-batch per step: each parameter gets exactly the standard step's arithmetic."""
    standard, _, _ = train(small_llama(), layerwise=False, accumulation=1, rule=rule, inner=inner)
    layerwise, optimizer, _ = train(small_llama(), layerwise=True, accumulation=1, rule=rule, inner=inner)
    assert optimizer.refresh_count == 14 * 2  # 14 projected weights, steps 1 and 3
    for name, value in standard.items():
        assert torch.equal(layerwise[name], value), name


@pytest.mark.parametrize("rule, inner", [("galore", "adamw"), ("galore", "lion"), ("fira", "adamw")])
def test_layerwise_accumulation_matches_standard(rule, inner):
    """Accumulation 4: GaLore sums Pᵀ Gᵢ (= Pᵀ Σ Gᵢ, up to the order of sums), Fira sums the
    full gradients; float64 so that only that reordering differs."""
    start = {n: p.detach().clone() for n, p in small_llama(torch.float64).named_parameters()}
    standard, _, _ = train(small_llama(torch.float64), layerwise=False, accumulation=4, rule=rule, inner=inner)
    layerwise, _, _ = train(small_llama(torch.float64), layerwise=True, accumulation=4, rule=rule, inner=inner)
    for name, value in standard.items():
        assert not torch.equal(value, start[name]), name
        torch.testing.assert_close(layerwise[name], value, rtol=0, atol=1e-9, msg=name)


def test_layerwise_accumulation_with_stacked_experts():
    """A Mixtral's E×m×n expert stacks (one basis per expert) accumulate their projections and
    step inside backward like the standard mode (accumulation 2; float32, which transformers'
    grouped expert matmul requires, so sums reordered by accumulation differ by rounding)."""
    def make():
        torch.manual_seed(0)
        return Mixtral("tiny", vocab_size=64, num_experts=4, **SMALL)

    standard, _, _ = train(make(), layerwise=False, accumulation=2)
    layerwise, optimizer, _ = train(make(), layerwise=True, accumulation=2)
    assert [len(g["params"]) for g in optimizer.param_groups if g.get("layout") == "experts"] == [4]
    for name, value in standard.items():
        torch.testing.assert_close(layerwise[name], value, rtol=0, atol=1e-6, msg=name)


TRANSFORMS = {
    "q-galore-int8-weights": lambda model: quantize_linear_weights(model, DEFAULT_TARGETS, bits=8,
                                                                   exclude=DEFAULT_EXCLUDE),
    "gradnorm-weight-norm": lambda model: apply_gradnorm(model, DEFAULT_TARGETS, DEFAULT_EXCLUDE),
}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_layerwise_accumulation_with_quantized_or_reparameterized_weights(transform):
    """Q-GaLore's INT8 weights (a weight store updated through the optimizer) and GradNormLoRP's
    weight-normalized direction V also step inside backward, with accumulation 2."""
    make = lambda: small_llama(transform=TRANSFORMS[transform])  # noqa: E731
    standard, _, _ = train(make(), layerwise=False, accumulation=2)
    layerwise, _, _ = train(make(), layerwise=True, accumulation=2)
    for name, value in standard.items():
        torch.testing.assert_close(layerwise[name], value, rtol=0, atol=1e-6, msg=name)


def test_accumulators_hold_projections_except_on_refresh_windows():
    """Between micro-batches a GaLore weight keeps R_acc (r·max(m, n) numbers) and no gradient,
    unless its coming step refreshes the subspace; dense parameters keep their gradient."""
    model = small_llama()
    optimizer = build_optimizer(model, rank=RANK, update_gap=2, lr=1e-2)
    updates = LayerwiseUpdates(optimizer, accumulation=2).attach()
    low_rank = [p for p in optimizer.param_groups[0]["params"]]
    dense = [p for p in optimizer.param_groups[1]["params"]]
    data = iter(batches(6))

    def micro_batch():
        tokens = next(data)
        model(tokens, labels=tokens).loss.backward()

    micro_batch()  # window of step 1: the first SVD needs the full gradients
    assert all(p.grad is not None for p in low_rank + dense)
    assert updates.accumulator_bytes() == {"low_rank": 0, "full": sum(p.numel() * 4 for p in low_rank + dense)}
    micro_batch()
    assert optimizer.refresh_count == 14 and all(p.grad is None for p in model.parameters())
    micro_batch()  # window of step 2: no refresh (gap 2)
    assert all(p.grad is None for p in low_rank) and all(p.grad is not None for p in dense)
    expected_low = sum(RANK * max(p.shape) * 4 for p in low_rank)
    assert updates.accumulator_bytes() == {"low_rank": expected_low, "full": sum(p.numel() * 4 for p in dense)}
    micro_batch()
    assert updates.accumulator_bytes() == {"low_rank": 0, "full": 0}


def test_explicit_window_end_and_unused_parameters():
    """``final`` ends a window early (Lightning's last batch of an epoch); a parameter with a
    gradient earlier in the window but none in its last micro-batch is still stepped."""
    model = small_llama()
    optimizer = build_optimizer(model, rank=RANK, update_gap=2, lr=1e-2)
    updates = LayerwiseUpdates(optimizer, accumulation=4).attach()
    head = model.lm_head.weight
    tokens = batches(1)[0]
    model(tokens, labels=tokens).loss.backward()
    before = head.detach().clone()
    updates.final = True
    model.model(tokens).last_hidden_state.sum().backward()  # lm_head unused in this micro-batch
    assert not torch.equal(head.detach(), before) and head.grad is None
    assert updates.micro_batch == 0 and updates.final is None
    assert int(optimizer.state[head]["step"]) == 1


def test_rejects_other_optimizers_and_bad_accumulation():
    model = small_llama()
    with pytest.raises(TypeError, match="LowRankOptimizer"):
        LayerwiseUpdates(torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match="accumulation"):
        LayerwiseUpdates(build_optimizer(model, rank=RANK), accumulation=0)


def _script():
    path = Path(__file__).parents[2] / "scripts" / "measure_layerwise_memory.py"
    spec = importlib.util.spec_from_file_location("measure_layerwise_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_backward_peak_drops_by_about_the_gradient_size():
    """Allocator-measured peak of forward+backward (scripts/measure_layerwise_memory.py) on a
    LLaMA whose gradients outweigh its activations: layer-wise mode saves the gradients that no
    longer coexist — all but about the largest one (computed here from the parameter shapes)."""
    script = _script()
    result = script.measure(hidden=256, layers=2, vocab=1024, batch=1, seq=16, rank=32)
    model = script.small_llama(256, 2, 1024)
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    no_longer_coexisting = sum(sizes) - max(sizes)
    assert result["gradient_bytes"] == sum(sizes)
    assert 0.8 * no_longer_coexisting <= result["saved_bytes"] <= 1.01 * sum(sizes)


@requires_cuda
def test_backward_peak_drops_by_about_the_gradient_size_cuda():
    """The same on CUDA, measured with ``torch.cuda.max_memory_allocated``."""
    script = _script()
    result = script.measure(hidden=256, layers=2, vocab=1024, batch=1, seq=16, rank=32, device="cuda")
    sizes = [p.numel() * p.element_size() for p in script.small_llama(256, 2, 1024).parameters()]
    assert 0.8 * (sum(sizes) - max(sizes)) <= result["saved_bytes"] <= 1.01 * sum(sizes)
