"""Loading a LowRankOptimizer state: a state that does not fit is refused before anything
changes (naming the parameter), option differences are warned about or refused, and state
tensors come back in their saved dtype (exact bf16 resume with Adafactor)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from lit_lowrank import build_optimizer


def _build(model, **options):
    """build_optimizer on these block-less toy models, projecting their `attn` and `mlp` layers."""
    return build_optimizer(model, **{"targets": ["attn", "mlp"], **options})


class Pair(nn.Module):
    def __init__(self, width: int = 24) -> None:
        super().__init__()
        self.attn = nn.Linear(16, width)
        self.mlp = nn.Linear(width, 16)

    def forward(self, x):
        return self.mlp(torch.tanh(self.attn(x)))


def _train(model, optimizer, batches):
    for batch in batches:
        generator = torch.Generator().manual_seed(batch)
        dtype = model.attn.weight.dtype
        x = torch.randn(8, 16, generator=generator).to(dtype)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


def _saved(model_factory=Pair, steps=3, **options):
    torch.manual_seed(0)
    model = model_factory()
    optimizer = _build(model, **{"rank": 4, "update_gap": 2, **options})
    _train(model, optimizer, range(steps))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _refused(optimizer, state, match):
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match=match):
        optimizer.load_state_dict(state)
    after = optimizer.state_dict()
    assert after.keys() == before.keys() and after["state"].keys() == before["state"].keys()
    assert after["param_groups"] == before["param_groups"]
    assert all(after["state"][i].keys() == entry.keys() for i, entry in before["state"].items())


def test_state_of_other_shapes_is_refused_naming_the_parameter():
    saved = _saved()
    model = Pair(width=32)
    optimizer = _build(model, rank=4, update_gap=2)
    _train(model, optimizer, range(1))
    _refused(optimizer, saved["optimizer"], r"'exp_avg' of attn\.weight has shape \(24, 4\), expected \(32, 4\)")


def test_dense_state_of_other_shapes_is_refused_naming_the_parameter():
    saved = _saved()["optimizer"]
    saved["state"][2]["exp_avg"] = torch.zeros(5)  # param 2 is the dense attn.bias
    optimizer = _build(Pair(), rank=4, update_gap=2)
    _refused(optimizer, saved, r"'exp_avg' of attn\.bias has shape \(5,\), expected \(24,\)")


def test_changed_targets_are_refused():
    """Same shapes, other targets: the checkpoint's low-rank state would train another layer."""
    def square_pair():
        return Pair(width=16)
    saved = _saved(square_pair, targets=["attn"])
    optimizer = _build(square_pair(), rank=4, update_gap=2, targets=["mlp"])
    _refused(optimizer, saved["optimizer"],
             r"param group 0 .*holds \['mlp\.weight'\] here but \['attn\.weight'\] in the checkpoint")


@pytest.mark.parametrize("option, value", [("rank", 8), ("inner", "lion"), ("projector", "random"),
                                           ("side", "right"), ("rule", "fira")])
def test_options_that_shape_the_state_are_refused(option, value):
    saved = _saved()
    optimizer = _build(Pair(), **{"rank": 4, "update_gap": 2, option: value})
    _refused(optimizer, saved["optimizer"], f"saved with {option}=.*Resume with {option}")


def test_other_option_changes_warn_and_this_runs_values_win():
    saved = _saved(weight_decay=0.1, update_gap=2, lr=1e-3)["optimizer"]
    saved["param_groups"][0]["lr"] = saved["param_groups"][1]["lr"] = 5e-4  # as a scheduler would leave it
    optimizer = _build(Pair(), rank=4, update_gap=5, weight_decay=0.0, lr=1e-3)
    with pytest.warns(UserWarning, match=r"update_gap: 2 -> 5.*weight_decay: 0\.1 -> 0\.0"):
        optimizer.load_state_dict(saved)
    lowrank, dense = optimizer.param_groups
    assert lowrank["update_gap"] == 5 and lowrank["weight_decay"] == 0.0 and dense["weight_decay"] == 0.0
    assert lowrank["lr"] == dense["lr"] == 5e-4  # the LR scheduler's value is the checkpoint's
    assert optimizer.projectors  # the state itself was loaded


def test_adafactor_resume_with_bf16_params_is_bitwise():
    """Adafactor's float32 statistics of a bf16 weight stay float32 through a checkpoint."""
    def bf16_pair():
        torch.manual_seed(0)
        return Pair().to(torch.bfloat16)
    options = dict(rank=4, update_gap=2, lr=1e-2, inner="adafactor", inner_args={"beta1": 0.9})
    straight = bf16_pair()
    _train(straight, _build(straight, **options), range(6))

    first = bf16_pair()
    first_optimizer = _build(first, **options)
    _train(first, first_optimizer, range(3))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = bf16_pair()
    resumed.load_state_dict(saved["model"])
    optimizer = _build(resumed, **copy.deepcopy(options))
    optimizer.load_state_dict(saved["optimizer"])
    assert optimizer.state[resumed.attn.weight]["exp_avg_sq_row"].dtype == torch.float32
    assert optimizer.state[resumed.attn.bias]["exp_avg"].dtype == torch.bfloat16  # dense moments follow the param
    _train(resumed, optimizer, range(3, 6))
    for want, got in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(got, want)


def test_skipped_steps_survive_a_checkpoint():
    model = Pair()
    optimizer = _build(model, rank=4)
    _train(model, optimizer, range(1))
    model.attn.weight.grad.fill_(float("nan"))
    with pytest.warns(RuntimeWarning, match="skipped"):
        optimizer.step()
    again = _build(Pair(), rank=4)
    again.load_state_dict(optimizer.state_dict())
    assert again.skipped_steps == 1


def test_projector_bases_of_other_shapes_are_refused():
    saved = _saved(side="left")
    optimizer = _build(Pair(width=32), rank=4, update_gap=2, side="left")
    _refused(optimizer, saved["optimizer"], r"projector of attn\.weight has bases \(left \(24, 4\), right None\) "
                                            r"for another shape than its 32×16 weight")


def test_a_checkpoint_of_the_earlier_format_resumes_exactly():
    """Earlier versions kept projectors and schedules in a top-level ``"lowrank"`` entry by index;
    such a checkpoint still resumes as the current one does."""
    checkpoint = _saved(steps=3)
    current = copy.deepcopy(checkpoint["optimizer"])
    earlier = copy.deepcopy(current)
    earlier["lowrank"] = {index: earlier["state"][index].pop("subspace") for index in list(earlier["state"])
                          if "subspace" in earlier["state"][index]}
    assert earlier["lowrank"] and all("subspace" not in entry for entry in earlier["state"].values())
    finals = []
    for saved in (current, earlier):
        model = Pair()
        model.load_state_dict(checkpoint["model"])
        optimizer = _build(model, rank=4, update_gap=2)
        optimizer.load_state_dict(saved)
        _train(model, optimizer, range(3, 6))  # a refresh at step 4
        finals.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals))


# ---------------------------------------------------------------- plugins named in checkpoints
from lit_lowrank import hookimpl  # noqa: E402
from lit_lowrank.projectors.svd import SVDProjector  # noqa: E402


class FirstSVD(SVDProjector):
    """A plugin's projector (package pkg-a)."""


class SecondSVD(SVDProjector):
    """Another plugin's projector under the same name (package pkg-b), or pkg-a's replacement."""


def _projector_plugin(name, cls):
    class Plugin:
        @hookimpl
        def register_projectors(self, register):
            register(name, cls)

    return Plugin()


def _path(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


def test_a_checkpoint_records_each_component_by_qualified_name_and_class(fresh_plugins):
    fresh_plugins.register_plugin(_projector_plugin("twin", FirstSVD), name="pkg-a:a")
    saved = _saved(projector="twin")["optimizer"]
    lowrank, dense = saved["param_groups"]
    assert "components" not in dense
    assert lowrank["components"] == {
        "projector": {"name": "pkg-a:twin", "class": _path(FirstSVD)},
        "rule": {"name": "lit_lowrank:galore", "class": _path(fresh_plugins.get_update_rule("galore"))},
        "inner": {"name": "lit_lowrank:adamw", "class": _path(fresh_plugins.get_inner_optimizer("adamw"))},
        "schedule": {"name": "lit_lowrank:fixed", "class": _path(fresh_plugins.get_schedule("fixed"))},
    }


def test_a_name_that_became_ambiguous_resumes_under_its_qualified_name(fresh_plugins):
    fresh_plugins.register_plugin(_projector_plugin("twin", FirstSVD), name="pkg-a:a")
    checkpoint = _saved(projector="twin")
    fresh_plugins.register_plugin(_projector_plugin("twin", SecondSVD), name="pkg-b:b")  # installed later
    with pytest.warns(RuntimeWarning, match="'twin' is registered by several plugins"):
        fresh_plugins.registered("projectors")
    model = Pair()
    model.load_state_dict(checkpoint["model"])
    optimizer = _build(model, rank=4, update_gap=2, projector="pkg-a:twin")
    optimizer.load_state_dict(checkpoint["optimizer"])
    assert all(type(projector) is FirstSVD for projector in optimizer.projectors.values())
    other = _build(Pair(), rank=4, update_gap=2, projector="pkg-b:twin")
    _refused(other, checkpoint["optimizer"], rf"saved with projector='pkg-a:twin' \({_path(FirstSVD)}\), this "
                                             rf"optimizer has 'pkg-b:twin' \({_path(SecondSVD)}\).*Resume with "
                                             r"projector: 'pkg-a:twin'")


def test_a_replaced_package_is_refused_naming_both_classes(fresh_plugins):
    fresh_plugins.register_plugin(_projector_plugin("echo", FirstSVD), name="pkg-a:a")
    checkpoint = _saved(projector="echo")
    fresh_plugins.unregister_plugin("pkg-a:a")
    fresh_plugins.register_plugin(_projector_plugin("echo", SecondSVD), name="pkg-a:a")  # same package, other class
    optimizer = _build(Pair(), rank=4, update_gap=2, projector="echo")
    _refused(optimizer, checkpoint["optimizer"],
             rf"saved with projector='pkg-a:echo' \({_path(FirstSVD)}\), this optimizer has 'echo' "
             rf"\({_path(SecondSVD)}\).*'pkg-a:echo' is now {_path(SecondSVD)}: install the package that provides "
             rf"{_path(FirstSVD)}")


def test_a_checkpoint_without_the_record_resumes_by_name(fresh_plugins):
    """Earlier checkpoints name components bare: they resume under the same name, or, once the
    name is ambiguous, under a qualified name of it; another component is still refused."""
    fresh_plugins.register_plugin(_projector_plugin("twin", FirstSVD), name="pkg-a:a")
    checkpoint = _saved(projector="twin")
    earlier = copy.deepcopy(checkpoint["optimizer"])
    for group in earlier["param_groups"]:
        group.pop("components", None)
    _build(Pair(), rank=4, update_gap=2, projector="twin").load_state_dict(copy.deepcopy(earlier))
    fresh_plugins.register_plugin(_projector_plugin("twin", SecondSVD), name="pkg-b:b")
    with pytest.warns(RuntimeWarning, match="several plugins"):
        fresh_plugins.registered("projectors")
    _build(Pair(), rank=4, update_gap=2, projector="pkg-a:twin").load_state_dict(copy.deepcopy(earlier))
    _refused(_build(Pair(), rank=4, update_gap=2, projector="svd"), earlier, "saved with projector='twin'")


def test_a_quantizer_is_recorded_and_may_be_named_qualified_on_resume(fresh_plugins):
    args = {"quantizer": "int", "quantizer_args": {"bits": 8, "group_size": 16}}
    checkpoint = _saved(projector_args=args)["optimizer"]
    quantizer = fresh_plugins.get_quantizer("int")
    assert checkpoint["param_groups"][0]["components"]["projector_args.quantizer"] == {
        "name": "lit_lowrank:int", "class": _path(quantizer)}
    qualified = {**args, "quantizer": "lit_lowrank:int"}
    _build(Pair(), rank=4, update_gap=2, projector_args=qualified).load_state_dict(copy.deepcopy(checkpoint))
    _refused(_build(Pair(), rank=4, update_gap=2), checkpoint,
             rf"saved with projector_args\.quantizer='lit_lowrank:int' \({_path(quantizer)}\), this optimizer has none")
