"""The memory estimator against bytes measured on a small real LLaMA after a step
(``LowRankOptimizer.state_bytes``, real gradients, real INT8 weights), and a closed form at 7B."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lit_lowrank import LowRankOptimizer, UnknownComponentError, build_optimizer, hookimpl, plugins
from lit_lowrank.memory import BASELINES, estimate, llama_on_meta
from lit_lowrank.activations import bind_compact, compact_linear_layers
from lit_lowrank.methods import Method
from lit_lowrank.reparam.gradnorm import apply_gradnorm
from lit_lowrank.optim.factory import DEFAULT_EXCLUDE, DEFAULT_TARGETS
from lit_lowrank.quantizers.quantized_linear import quantize_linear_weights

RANK = 16  # q/k/v/o moments 16×128 < 4096 stay float; MLP moments 16×344 are 8-bit
UNESTIMATED = {"adaptive-rank"}  # its ranks depend on the gradients' spectra
ADAFACTOR_BETA1 = Method("Adafactor with a first moment", {"inner": "adafactor", "inner_args": {"beta1": 0.9}})


@pytest.fixture(scope="module", autouse=True)
def adafactor_beta1_plugin():
    """A method shipped by a plugin: the estimator reads it from the registry like a built-in."""

    class Plugin:
        @hookimpl
        def register_methods(self, register):
            register("galore-adafactor-beta1", ADAFACTOR_BETA1)

    plugins.register_plugin(Plugin(), name="adafactor-beta1-recipe")
    yield
    plugins.unregister_plugin("adafactor-beta1-recipe")


def estimated_methods() -> list[str]:
    return [name for name in plugins.registered("methods") if name not in UNESTIMATED] + ["galore-adafactor-beta1"]


def recipe(name: str) -> Method:
    return ADAFACTOR_BETA1 if name == "galore-adafactor-beta1" else plugins.get_method(name)


def small_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=344, num_attention_heads=4,
                         num_key_value_heads=4, num_hidden_layers=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def prepared(name: str) -> tuple[LlamaForCausalLM, torch.optim.Optimizer]:
    model = small_llama()
    if name == "adamw":
        return model, LowRankOptimizer([{"params": list(model.parameters())}])
    return model, transformed_optimizer(model, recipe(name), DEFAULT_TARGETS)


def transformed_optimizer(model: torch.nn.Module, method: Method, targets, **options) -> torch.optim.Optimizer:
    """``build_optimizer(model, method=...)`` on the model with the method's transforms (and
    CompAct's layers bound to the optimizer)."""
    transform(model, method, targets)
    optimizer = build_optimizer(model, method=method, targets=targets, **options, **rank_unless_fixed(method))
    if method.compact:
        bind_compact(model, optimizer)
    return optimizer


def rank_unless_fixed(method: Method) -> dict:
    """``rank=RANK`` unless the method fixes its rank (APOLLO-Mini: 1)."""
    return {} if "rank" in method.options else {"rank": RANK}


def transform(model: torch.nn.Module, method: Method, targets) -> None:
    """The model transforms ``method`` trains: weight normalization, INT8 weights, compressed layers."""
    if method.gradnorm:
        apply_gradnorm(model, targets)
    if method.weight_bits is not None:
        quantize_linear_weights(model, targets, bits=method.weight_bits, exclude=DEFAULT_EXCLUDE)
    if method.compact:
        compact_linear_layers(model, targets)


def backward(model: LlamaForCausalLM) -> None:
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()


@pytest.mark.parametrize("name", ["adamw", *estimated_methods()])
def test_state_and_gradient_bytes_equal_measured(name):
    model, optimizer = prepared(name)
    predicted = estimate(model, name, rank=RANK)
    backward(model)
    received = optimizer._received  # CompAct's R, delivered instead of the targets' gradients
    held = [p.grad for p in model.parameters() if p.grad is not None] + list(received.values())
    assert predicted.gradients == sum(t.numel() * t.element_size() for t in held)
    optimizer.step()
    assert predicted.states == optimizer.state_bytes()


def test_layerwise_keeps_one_gradient():
    model, _ = prepared("galore-8bit")
    backward(model)
    largest = max(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    result = estimate(model, "galore-8bit-layerwise", rank=RANK)
    assert result.gradients == largest
    assert result.states == estimate(model, "galore-8bit", rank=RANK).states


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
    with pytest.raises(UnknownComponentError, match="galore-8bit"):
        estimate(small_llama(), "galore9bit", rank=RANK)


@pytest.mark.parametrize("name", sorted(UNESTIMATED))
def test_a_method_without_a_formula_is_refused(name):
    with pytest.raises(ValueError, match="state_bytes"):
        estimate(small_llama(), name, rank=RANK)


def test_subset_norms_other_than_auto_have_no_formula():
    """Rows or columns of R hold r or max(m, n) values depending on the side: not estimated."""
    recipe = Method("GaLore-SN over R's rows", {"inner": "adamw-sn", "inner_args": {"subsets": "rows"}})
    with pytest.raises(ValueError, match="subsets are not 'auto'.*state_bytes"):
        estimate(small_llama(), recipe, rank=RANK)


def test_cli_prints_a_row_per_method(monkeypatch, capsys):
    script = Path(__file__).parents[2] / "scripts" / "estimate_memory.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--size", "60m", "--methods", "adamw", "q-galore-layerwise"])
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
@pytest.mark.parametrize("name", ["adamw", *estimated_methods()])
def test_state_bytes_equal_measured_on_odd_shapes(name, dtype):
    torch.manual_seed(0)
    model = OddShapes(dtype)
    if name == "adamw":
        optimizer = LowRankOptimizer([{"params": list(model.parameters())}])
    else:
        optimizer = transformed_optimizer(model, recipe(name), ["mlp"], exclude=["head"])
    predicted = estimate(model, name, rank=RANK, targets=["mlp"], exclude=["head"])
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
        gradnorm = name not in BASELINES and plugins.get_method(name.removesuffix("-layerwise")).gradnorm
        result = estimate(models[gradnorm], name, rank=1024)
        expected = [result.weights, result.gradients, result.optimizer, result.total]
        assert figures == [f"{value / 2**30:.2f}" for value in expected], name


@pytest.mark.parametrize("name", ["apollo", "apollo-mini", "galore-dct"])
def test_uncached_projection_is_estimated_as_measured(name):
    model = OddShapes(torch.bfloat16)
    base = plugins.get_method(name)
    uncached = Method(base.description, {**base.options, "projector_args": {"cache_basis": False}})
    optimizer = build_optimizer(model, method=uncached, targets=["mlp"], exclude=["head"], **rank_unless_fixed(uncached))
    predicted = estimate(model, uncached, rank=RANK, targets=["mlp"], exclude=["head"])
    model(torch.randn(4, 53, dtype=torch.bfloat16)).square().mean().backward()
    optimizer.step()
    assert predicted.states == optimizer.state_bytes()
    assert predicted.optimizer < estimate(model, name, rank=RANK, targets=["mlp"], exclude=["head"]).optimizer


@pytest.mark.parametrize("name", ["galore", "galore-rsvd", "fira", "apollo", "apollo-mini", "galore-lion"])
def test_expert_stacks_are_estimated_as_measured(name):
    from lit_lowrank.models import Mixtral

    torch.manual_seed(0)
    model = Mixtral("tiny", vocab_size=512, hidden_size=64, intermediate_size=96, num_heads=2, num_layers=1)
    optimizer = build_optimizer(model, method=name, **rank_unless_fixed(recipe(name)))
    predicted = estimate(model, name, rank=RANK)
    backward(model)
    optimizer.step()
    assert predicted.states == optimizer.state_bytes()
