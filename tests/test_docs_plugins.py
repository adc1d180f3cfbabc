"""docs/plugins.md runs: every ``python`` block is a complete plugin module that registers, trains
a two-weight model inside ``LowRankOptimizer``, does what its text says (checked against a plain
computation here), and resumes exactly through ``torch.save``/``torch.load(weights_only=True)``."""

from __future__ import annotations

import copy
import io
import re
import types
from pathlib import Path

import pytest
import torch
import yaml

import lit_lowrank
from lit_lowrank import LowRankOptimizer, RuleInputs, plugins

DOCS = Path(__file__).parents[1] / "docs" / "plugins.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)
YAML_BLOCKS = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)
RANK, GAP = 3, 2


def exec_block(index: int, code: str) -> types.ModuleType:
    """One ``python`` block of the guide, run as its own module."""
    module = types.ModuleType(f"docs_plugins_example_{index}")
    exec(compile(code, f"{DOCS}:block{index}", "exec"), module.__dict__)
    return module


def registered_names(module: types.ModuleType) -> dict[str, list[str]]:
    """The names each ``register_<kind>`` hook of ``module`` registers, by kind."""
    names: dict[str, list[str]] = {}
    for kind in plugins.KINDS:
        hook = getattr(module, f"register_{kind}", None)
        if hook is not None:
            hook(lambda name, component: names.setdefault(kind, []).append(name))
    return names


def load_examples() -> dict[str, dict[str, type]]:
    """Exec every block as its own module, register it, and return what it added, by kind."""
    before = {kind: set(plugins.registered(kind)) for kind in plugins.KINDS}
    for index, code in enumerate(BLOCKS):
        module = exec_block(index, code)
        lit_lowrank.register_plugin(module, name=module.__name__)
    return {kind: {name: plugins.get(kind, name) for name in set(plugins.registered(kind)) - before[kind]}
            for kind in plugins.KINDS}


@pytest.fixture
def examples(fresh_plugins):
    return load_examples()


def options(kind: str, name: str) -> dict:
    """Optimizer options that put the example component ``name`` of ``kind`` to use."""
    if kind == "methods":
        return dict(plugins.get_method(name).options)
    if kind == "quantizers":  # the basis and the 8-bit moments both packed by it
        return dict(projector_args={"quantizer": name}, inner="adamw8bit",
                    inner_args={"quantizer": name, "min_8bit_size": 1})
    key = {"projectors": "projector", "update_rules": "rule", "inner_optimizers": "inner", "schedules": "schedule"}
    return {key[kind]: name}


def make(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 12, bias=False), torch.nn.Tanh(), torch.nn.Linear(12, 6, bias=False))


def train(model, optimizer, steps: int, generator: torch.Generator) -> None:
    for _ in range(steps):
        x, y = torch.randn(16, 8, generator=generator), torch.randn(16, 6, generator=generator)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def optimizer_for(model, **kwargs) -> LowRankOptimizer:
    return LowRankOptimizer([{"params": list(model.parameters()), "lowrank": True}], lr=0.01, rank=RANK,
                            update_gap=GAP, **kwargs)


def test_the_examples_cover_every_kind(examples):
    assert all(examples[kind] for kind in plugins.KINDS), examples
    assert all(name in lit_lowrank.__all__ for name in ("RuleInputs", "hookimpl", "Packed", "Side", "Transform",
                                                        "StoredWeight"))


@pytest.mark.parametrize("side", ["std", "full"])
def test_every_example_trains_and_resumes_exactly(examples, side):
    for kind, components in examples.items():
        if kind == "transforms":  # they change the model, not the optimizer: test_the_transform_example_...
            continue
        for name in components:
            model = make()
            optimizer = optimizer_for(model, side=side, **options(kind, name))
            generator = torch.Generator().manual_seed(1)
            train(model, optimizer, 5, generator)
            buffer = io.BytesIO()
            torch.save(optimizer.state_dict(), buffer)
            buffer.seek(0)
            resumed_model = copy.deepcopy(model)
            resumed = optimizer_for(resumed_model, side=side, **options(kind, name))
            resumed.load_state_dict(torch.load(buffer, weights_only=True))
            state = generator.get_state()
            train(model, optimizer, 4, generator)
            train(resumed_model, resumed, 4, torch.Generator().set_state(state))
            for mine, theirs in zip(model.parameters(), resumed_model.parameters()):
                torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=f"{kind} {name!r} side={side}")


def test_the_transform_example_keeps_the_contract_and_freezes_only_target_biases(examples):
    from lit_lowrank.lightning import LowRankConfig
    from lit_lowrank.testing import check_transform

    check_transform(examples["transforms"]["my-freeze-bias"])
    model = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Tanh(), torch.nn.Linear(12, 6))
    LowRankConfig(targets=["0"], transforms={"my-freeze-bias": {}}).prepare(model)
    assert [name for name, p in model.named_parameters() if not p.requires_grad] == ["0.bias"]


def test_top_norm_projectors_keep_the_largest_columns(examples):
    grad = torch.randn(10, 7)
    kept = grad[:, grad.norm(dim=0).topk(RANK).indices]  # right side: n=7 < m=10
    for name in examples["projectors"]:
        projector = plugins.get_projector(name)(RANK)
        projector.refresh(grad)
        torch.testing.assert_close(projector.project(grad), kept)
        torch.testing.assert_close(projector.project_back(kept), grad * torch.isin(
            torch.arange(7), grad.norm(dim=0).topk(RANK).indices))


def test_momentum_is_a_bias_corrected_average(examples):
    (cls,) = examples["inner_optimizers"].values()
    inner = cls(betas=(0.8, 0.999))
    lows = [torch.randn(3, 4) for _ in range(3)]
    state = inner.init_state(lows[0])
    for step, low in enumerate(lows, start=1):
        (direction,) = inner.directions([low], [state], step)
    weights = [0.2 * 0.8**2, 0.2 * 0.8, 0.2]  # (1 − β) β^(t−k)
    expected = sum(w * low for w, low in zip(weights, lows)) / (1 - 0.8**3)
    torch.testing.assert_close(direction, expected)


def test_capped_rule_limits_the_growth_of_the_step(examples):
    (cls,) = examples["update_rules"].values()
    rule = cls(scale=1.0, growth=1.5)
    projector = plugins.get_projector("svd")(2)
    projector.refresh(torch.randn(6, 5))
    state, steps = {}, []
    for size in (1.0, 10.0, 0.1):
        param = torch.zeros(6, 5)
        direction = size * torch.ones(6, 2)
        rule.apply_(param, RuleInputs(None, direction, direction, projector, state), step_size=1.0)
        steps.append(param.norm().item())
    lifted = projector.project_back(torch.ones(6, 2)).norm().item()
    assert steps == pytest.approx([lifted, 1.5 * lifted, 0.1 * lifted], rel=1e-5)


def test_method_builds_its_recipe(examples):
    (name,) = examples["methods"]
    group = lit_lowrank.build_optimizer(make(), method=name, targets=[r"^\d$"]).param_groups[0]
    assert (group["projector"], group["inner"], group["rule"], group["rule_args"]) == (
        "my-top-norm", "my-momentum", "my-capped-galore", {"growth": 2.0})


def test_doubling_schedule_refreshes_at_0_T_3T_7T(examples):
    (cls,) = examples["schedules"].values()
    schedule, refreshed = cls(gap=2), []
    for step in range(16):
        if schedule.should_refresh(step):
            refreshed.append(step)
            schedule.after_refresh(step, None)
    assert refreshed == [0, 2, 6, 14]


def test_absmax_quantizer_errs_by_half_a_step_of_each_group(examples):
    (cls,) = examples["quantizers"].values()
    x = torch.randn(5, 7)
    for group_size, groups in ((4, x.flatten()[:32].view(8, 4)), (-1, x)):  # 35 = 8 groups of 4 + 3
        quantizer = cls(group_size=group_size)
        error = (quantizer.dequantize(quantizer.quantize(x)) - x).abs()
        step = groups.abs().amax(dim=1, keepdim=True) / 127
        assert (error.flatten()[: groups.numel()].view_as(groups) <= step / 2 + 1e-7).all()
    with pytest.raises(ValueError, match="absmax8"):
        cls(bits=4)


def test_no_name_the_guide_registers_is_a_builtin(fresh_plugins):
    """A copied example registering a built-in's name would silently train the built-in."""
    taken = {kind: {name for name in plugins.registered(kind) if ":" not in name} for kind in plugins.KINDS}
    for index, code in enumerate(BLOCKS):
        for kind, names in registered_names(exec_block(index, code)).items():
            assert not set(names) & taken[kind], f"docs/plugins.md block {index} registers the built-in {kind} {names}"


def test_the_guide_registers_every_name_its_config_uses(examples):
    """The YAML config after "configs use them" names the guide's components, with options they
    take: it builds an optimizer whose components are the guide's classes."""
    (config,) = (yaml.safe_load(block)["lowrank"] for block in YAML_BLOCKS)
    kinds = {"projector": "projectors", "inner": "inner_optimizers", "rule": "update_rules", "schedule": "schedules"}
    for option, kind in kinds.items():
        assert config[option] in examples[kind], f"{option}: {config[option]!r} is not one of the guide's {kind}"
    model = make()
    train(model, optimizer_for(model, **config), 3, torch.Generator().manual_seed(0))


def test_a_users_args_replace_the_methods_dict_as_the_guide_says(examples):
    """The guide: a ``*_args`` dict set next to ``method`` replaces the method's whole dict."""
    (name,) = examples["methods"]
    with pytest.warns(UserWarning, match="replaces method"):
        optimizer = lit_lowrank.build_optimizer(make(), method=name, targets=[r"^\d$"], rule_args={})
    assert optimizer.param_groups[0]["rule_args"] == {}  # the rule is built with its defaults: growth 1.01
    with pytest.warns(UserWarning, match="replaces method"):
        merged = plugins.get_method("q-galore").merged("q-galore", {"projector_args": {"quantizer": "int"}})
    assert merged["projector_args"] == {"quantizer": "int"}
