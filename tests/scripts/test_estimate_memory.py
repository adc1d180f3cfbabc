"""The memory estimator against bytes measured on a small real LLaMA after a step
(``LowRankOptimizer.state_bytes``, real gradients, real INT8 weights), and a closed form at 7B."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lit_lowrank import LowRankOptimizer, build_optimizer, plugins
from lit_lowrank.memory import METHODS, Formats, estimate, llama_on_meta
from lit_lowrank.reparam.gradnorm import apply_gradnorm
from lit_lowrank.optim.factory import DEFAULT_EXCLUDE, DEFAULT_TARGETS
from lit_lowrank.quantizers.quantized_linear import quantize_linear_weights

RANK = 16  # q/k/v/o moments 16×128 < 4096 stay float; MLP moments 16×344 are 8-bit
INT4_BASIS = {"quantizer": "int", "quantizer_args": {"bits": 4, "group_size": 256}}
OPTIONS = {  # how each method is built with the library
    "galore": {},
    "galore8bit": {"inner": "adamw8bit"},
    "fira": {"rule": "fira"},
    "galore-adafactor": {"inner": "adafactor"},
    "galore-adafactor-beta1": {"inner": "adafactor", "inner_args": {"beta1": 0.9}},
    "apollo": {"rule": "apollo", "projector": "random"},
    "apollo-mini": {"rule": "apollo-mini", "projector": "random", "rank": 1},
    "q-galore": {"inner": "adamw8bit", "projector_args": INT4_BASIS, "schedule": "lazy"},
    "gradnorm": {},
    "gradnorm8bit": {"inner": "adamw8bit"},
}


def small_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=344, num_attention_heads=4,
                         num_key_value_heads=4, num_hidden_layers=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def prepared(name: str) -> tuple[LlamaForCausalLM, torch.optim.Optimizer]:
    model = small_llama()
    if METHODS[name].gradnorm:
        apply_gradnorm(model)
    if METHODS[name].int8_weights:
        quantize_linear_weights(model, DEFAULT_TARGETS, exclude=DEFAULT_EXCLUDE)
    if name == "adamw":
        return model, LowRankOptimizer([{"params": list(model.parameters())}])
    for kind, key in (("update_rules", "rule"), ("projectors", "projector")):
        if key in OPTIONS[name] and OPTIONS[name][key] not in plugins.registered(kind):
            pytest.skip(f"{key} {OPTIONS[name][key]!r} is not registered")
    return model, build_optimizer(model, **{"rank": RANK, **OPTIONS[name]})


def backward(model: LlamaForCausalLM) -> None:
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()


@pytest.mark.parametrize("name", ["adamw", *OPTIONS])
def test_state_and_gradient_bytes_equal_measured(name):
    model, optimizer = prepared(name)
    predicted = estimate(model, name, rank=RANK)
    backward(model)
    assert predicted.gradients == sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    optimizer.step()
    assert predicted.states == optimizer.state_bytes()


def test_layerwise_keeps_one_gradient():
    model, _ = prepared("galore8bit")
    backward(model)
    largest = max(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    result = estimate(model, "galore8bit-layerwise", rank=RANK)
    assert result.gradients == largest
    assert result.states == estimate(model, "galore8bit", rank=RANK).states


def test_q_galore_weights_equal_the_int8_storage():
    model, _ = prepared("q-galore")
    real = sum(p.untyped_storage().nbytes() for p in model.parameters() if not hasattr(p, "weight_store"))
    real += sum(b.untyped_storage().nbytes() for n, b in model.named_buffers() if ".weight_" in n)
    assert estimate(model, "q-galore", rank=RANK).weights == real


def test_7b_adamw_matches_the_closed_form():
    hidden, inter, layers, vocab = 4096, 11008, 32, 32000
    params = 2 * vocab * hidden + layers * (4 * hidden**2 + 3 * hidden * inter + 2 * hidden) + hidden
    result = estimate(llama_on_meta("7b"), "adamw", rank=1024)
    assert (result.weights, result.gradients, result.optimizer) == (2 * params, 2 * params, 4 * params)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match="galore8bit"):
        estimate(small_llama(), "galore9bit", rank=RANK)


def test_cli_prints_a_row_per_method(monkeypatch, capsys):
    script = Path(__file__).parents[2] / "scripts" / "estimate_memory.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--model", "llama_60m", "--method", "adamw", "q-galore-layerwise"])
    runpy.run_path(str(script), run_name="__main__")
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["method", "adamw", "q-galore-layerwise"]


class OddShapes(torch.nn.Module):
    """Target weights whose sizes fill no quantization group or 8-bit block exactly, at rank 16:
    37×53 and 129×37 (k = 848, 2064 < 4096: 8-bit moments stay float) and 300×129 (k = 4800,
    8-bit over 18.75 blocks); INT4 bases of 592, 592 and 2064 values (partial groups of 256)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(53, 37, bias=False), torch.nn.Linear(37, 129),
                                       torch.nn.Linear(129, 300, bias=False))
        self.head = torch.nn.Linear(300, 7)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["adamw", *OPTIONS])
def test_state_bytes_equal_measured_on_odd_shapes(name, dtype):
    torch.manual_seed(0)
    model = OddShapes(dtype)
    if METHODS[name].gradnorm:
        apply_gradnorm(model, ["mlp"])
    if METHODS[name].int8_weights:
        quantize_linear_weights(model, ["mlp"])
    predicted = estimate(model, name, rank=RANK, targets=["mlp"], exclude=["head"])
    if name == "adamw":
        optimizer = LowRankOptimizer([{"params": list(model.parameters())}])
    else:
        optimizer = build_optimizer(model, targets=["mlp"], exclude=["head"], **{"rank": RANK, **OPTIONS[name]})
    model(torch.randn(4, 53, dtype=dtype)).square().mean().backward()
    optimizer.step()
    assert predicted.states == optimizer.state_bytes()


def test_readme_7b_table_is_the_estimators():
    """Every row of the README's LLaMA-7B table (bf16, rank 1024) is what the estimator prints."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    lines = readme[readme.index("LLaMA-7B, bf16, rank 1024, GiB"):].splitlines()[2:]
    table = lines[: next(i for i, line in enumerate(lines) if not line.startswith("|"))]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table[2:]]  # below the header
    assert len(rows) >= 10
    models = {gradnorm: llama_on_meta("7b", gradnorm=gradnorm) for gradnorm in (False, True)}
    for name, *figures in rows:
        spec = METHODS[name.removesuffix("-layerwise")]
        result = estimate(models[spec.gradnorm], name, rank=1024)
        expected = [result.weights, result.gradients, result.optimizer, result.total]
        assert figures == [f"{value / 2**30:.2f}" for value in expected], name


@pytest.mark.parametrize("name", ["apollo", "apollo-mini"])
def test_uncached_projection_is_estimated_as_measured(name):
    model = OddShapes(torch.bfloat16)
    options = {**OPTIONS[name], "projector_args": {"cache_basis": False}}
    optimizer = build_optimizer(model, targets=["mlp"], exclude=["head"], **{"rank": RANK, **options})
    predicted = estimate(model, name, rank=RANK, targets=["mlp"], exclude=["head"], formats=Formats(cache_basis=False))
    model(torch.randn(4, 53, dtype=torch.bfloat16)).square().mean().backward()
    optimizer.step()
    assert predicted.states == optimizer.state_bytes()
    assert predicted.optimizer < estimate(model, name, rank=RANK, targets=["mlp"], exclude=["head"]).optimizer
