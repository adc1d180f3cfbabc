"""The memory estimator against bytes measured on a small real LLaMA after a step
(``LowRankOptimizer.state_bytes``, real gradients, real INT8 weights), and a closed form at 7B."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lit_lowrank import (DenseBasisProjector, InnerOptimizer, LowRankOptimizer, Side, UnknownComponentError,
                         UpdateRule, build_optimizer, hookimpl, plugins)
from lit_lowrank.memory import estimate, estimate_model, llama_on_meta
from lit_lowrank import transforms
from lit_lowrank.methods import Method
from lit_lowrank.optim.factory import DEFAULT_EXCLUDE, DEFAULT_TARGETS

RANK = 16  # q/k/v/o moments 16×128 < 4096 stay float; MLP moments 16×344 are 8-bit
UNESTIMATED = {"adaptive-rank"}  # its ranks depend on the gradients' spectra
ADAFACTOR_BETA1 = Method("Adafactor with a first moment", {"inner": "adafactor", "inner_args": {"beta1": 0.9}})


class TopAxes(DenseBasisProjector):
    """A plugin's projector: the r coordinate axes of the projected side with the largest
    gradient norms, as one-hot columns."""

    def fit(self, grad: torch.Tensor, side: Side) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        axis = -2 if side == Side.LEFT else -1
        norms = torch.linalg.vector_norm(grad, dim=-1 if axis == -2 else -2)
        basis = torch.zeros(grad.shape[axis], self.rank, dtype=grad.dtype, device=grad.device)
        basis.scatter_(0, norms.topk(self.rank).indices[None], 1.0)
        return (basis, None) if side == Side.LEFT else (None, basis)


class RowScaledMomentum(InnerOptimizer):
    """A plugin's inner optimizer: ``N = M / (row RMS of M + ε)``, a float32 momentum of R and a
    float32 row RMS, whatever R's dtype."""

    linear_state = ("exp_avg",)

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.betas, self.eps = tuple(betas), eps

    def init_state(self, low: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"exp_avg": torch.zeros_like(low, dtype=torch.float32),
                "row_rms": low.new_zeros(low.shape[0], dtype=torch.float32)}

    def directions(self, lows, states, step):
        directions = []
        for low, state in zip(lows, states):
            momentum = state["exp_avg"].lerp_(low.float(), 1 - self.betas[0])
            state["row_rms"].copy_(momentum.square().mean(dim=1).sqrt())
            directions.append((momentum / (state["row_rms"][:, None] + self.eps)).to(low.dtype))
        return directions


class ColumnMaxGalore(UpdateRule):
    """A plugin's rule keeping state: GaLore's ``W ← W − η α lift(N)``, recording the largest
    norm each column of G has had (float32, one per column), declared by :meth:`state_layout`."""

    def apply_(self, param, inputs, *, step_size):
        norms = torch.linalg.vector_norm(inputs.grad.float(), dim=0)
        seen = inputs.state.setdefault("column_max", torch.zeros_like(norms))
        torch.maximum(seen, norms, out=seen)
        inputs.projector.add_back_(param, inputs.direction, alpha=-step_size * self.scale)

    def state_layout(self, grad, low, projector):
        return {"column_max": torch.linalg.vector_norm(grad.float(), dim=0)}


TOP_AXES = Method("a plugin's method: top-norm axes, row-scaled momentum, column maxima",
                  {"projector": "test-top-axes", "inner": "test-row-momentum", "rule": "test-column-max"})
PLUGIN_METHODS = {"galore-adafactor-beta1": ADAFACTOR_BETA1, "test-top-axes": TOP_AXES}
"""Methods registered by this file's plugin, estimated like the built-ins."""


@pytest.fixture(scope="module", autouse=True)
def test_plugin():
    """Methods and components shipped by a plugin: the estimator reads them from the registry
    like built-ins, and predicts their state from the components themselves."""

    class Plugin:
        @hookimpl
        def register_methods(self, register):
            for name, recipe in PLUGIN_METHODS.items():
                register(name, recipe)

        @hookimpl
        def register_projectors(self, register):
            register("test-top-axes", TopAxes)

        @hookimpl
        def register_inner_optimizers(self, register):
            register("test-row-momentum", RowScaledMomentum)

        @hookimpl
        def register_update_rules(self, register):
            register("test-column-max", ColumnMaxGalore)

    plugins.register_plugin(Plugin(), name="estimate-memory-test-plugin")
    yield
    plugins.unregister_plugin("estimate-memory-test-plugin")


def estimated_methods() -> list[str]:
    return [name for name in plugins.registered("methods") if name not in UNESTIMATED] + list(PLUGIN_METHODS)


def recipe(name: str) -> Method:
    return PLUGIN_METHODS[name] if name in PLUGIN_METHODS else plugins.get_method(name)


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
    transforms.bind(model, method.transforms, optimizer)
    return optimizer


def rank_unless_fixed(method: Method) -> dict:
    """``rank=RANK`` unless the method fixes its rank (APOLLO-Mini: 1)."""
    return {} if "rank" in method.options else {"rank": RANK}


def transform(model: torch.nn.Module, method: Method, targets) -> None:
    """The model transforms ``method`` trains: weight normalization, INT8 weights, compressed layers."""
    transforms.prepare(model, method.transforms, targets, DEFAULT_EXCLUDE)


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


@pytest.mark.parametrize("subsets", ["rows", "columns"])
def test_subset_norms_other_than_auto_are_estimated_as_measured(subsets):
    """Rows or columns of R hold r or max(m, n) values depending on the side: the components
    predict which (tests/optim/test_state_formulas.py has the closed form)."""
    recipe = Method("GaLore-SN over R's rows or columns", {"inner": "adamw-sn", "inner_args": {"subsets": subsets}})
    model = OddShapes(torch.float32)
    optimizer = build_optimizer(model, method=recipe, targets=["mlp"], exclude=["head"], rank=RANK)
    predicted = estimate(model, recipe, rank=RANK, targets=["mlp"], exclude=["head"])
    model(torch.randn(4, 53)).square().mean().backward()
    optimizer.step()
    assert predicted.states == optimizer.state_bytes()


def test_cli_prints_a_row_per_method(monkeypatch, capsys):
    script = Path(__file__).parents[2] / "scripts" / "estimate_memory.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--size", "60m", "--methods", "adamw", "q-galore-layerwise"])
    runpy.run_path(str(script), run_name="__main__")
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["method", "adamw", "q-galore-layerwise"]


def run_script(monkeypatch, capsys, *args: str) -> tuple[list[list[str]], str]:
    """The cells of each table row ``scripts/estimate_memory.py`` prints (header included), and
    its whole output."""
    script = Path(__file__).parents[2] / "scripts" / "estimate_memory.py"
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith("| ")]
    return rows, out


def test_cli_prints_a_plugin_method_as_estimated(monkeypatch, capsys):
    """A plugin's method (this file's components, in no table of the estimator) gets its row."""
    (header, row), _ = run_script(monkeypatch, capsys, "--size", "60m", "--methods", "test-top-axes")
    result = estimate(llama_on_meta("60m"), "test-top-axes", rank=128)
    expected = [result.weights, result.gradients, result.optimizer, result.total]
    assert row == ["test-top-axes", *(f"{value / 2**30:.2f}" for value in expected)]


def test_cli_prints_unknown_and_why_for_a_method_without_a_prediction(monkeypatch, capsys):
    (header, unknown, adamw), out = run_script(monkeypatch, capsys, "--size", "60m", "--methods", "adaptive-rank",
                                               "adamw")
    assert unknown == ["adaptive-rank", *["unknown"] * 4] and adamw[0] == "adamw"
    assert "no memory estimate for method 'adaptive-rank'" in out and "state_bytes() after a step" in out


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


def test_docs_7b_table_is_the_estimators():
    """Every row of the docs' LLaMA-7B table (docs/quantized.md: bf16, rank 1024) is what the estimator prints."""
    readme = (Path(__file__).parents[2] / "docs" / "quantized.md").read_text()
    lines = readme[readme.index("LLaMA-7B, bf16, rank 1024, GiB"):].splitlines()[2:]
    table = lines[: next(i for i, line in enumerate(lines) if not line.startswith("|"))]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table[2:]]  # below the header
    assert len(rows) >= 10
    for name, *figures in rows:
        result = estimate(estimate_model("7b", name), name, rank=1024)
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
