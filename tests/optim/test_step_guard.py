"""A step updates every parameter or none: non-finite gradients (``nonfinite`` policy), sparse
gradients and a failing subspace refresh leave weights, moments, projectors and counters
bit-identical; in layer-wise mode the policy applies per parameter."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from lit_lowrank import LowRankOptimizer, build_optimizer
from lit_lowrank.optim.layerwise import LayerwiseUpdates
from lit_lowrank.projectors.svd import SVDProjector
from steps import assert_identical, seeded_grads, weights_and_bias

RULES = [dict(rule="galore"), dict(rule="fira"), dict(rule="apollo", projector="random"),
         dict(rule="apollo-mini", projector="random", rank=1)]
INNERS = [dict(inner="adamw"), dict(inner="adafactor", inner_args={"beta1": 0.9}), dict(inner="lion"),
          dict(inner="adamw8bit", inner_args={"min_8bit_size": 1, "block_size": 64})]


def _setup(**options):
    return weights_and_bias({"first.weight": (12, 8), "second.weight": (6, 10)}, **options)


def _snapshot(params, optimizer):
    state = copy.deepcopy(optimizer.state_dict())
    state.pop("skipped_steps")
    state.pop("skip_streaks", None)  # counters: compared on their own
    bases = {i: optimizer.projectors[p].bases() for i, p in enumerate(params) if p in optimizer.projectors}
    return [p.detach().clone() for p in params], state, copy.deepcopy(bases)


def _all_finite(tree):
    if isinstance(tree, dict):
        return all(_all_finite(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(_all_finite(v) for v in tree)
    return not isinstance(tree, torch.Tensor) or not tree.is_floating_point() or bool(tree.isfinite().all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("good_steps", [1, 2], ids=["plain-step", "refresh-step"])  # update_gap 2: step 3 refreshes
@pytest.mark.parametrize("inner", INNERS, ids=lambda c: c["inner"])
@pytest.mark.parametrize("rule", RULES, ids=lambda c: c["rule"])
def test_nonfinite_gradient_skips_the_whole_step(rule, inner, good_steps, bad):
    params, optimizer = _setup(**rule, **inner)
    for seed in range(good_steps):
        seeded_grads(params, seed)
        optimizer.step()
    before = _snapshot(params, optimizer)
    seeded_grads(params, 10)
    params[1].grad[2, 3] = bad
    with pytest.warns(RuntimeWarning, match="non-finite gradient in second.weight: step skipped"):
        optimizer.step()
    after = _snapshot(params, optimizer)
    assert_identical(after, before)
    assert optimizer.skipped_steps == 1 and optimizer.state_dict()["skipped_steps"] == 1
    seeded_grads(params, 11)
    optimizer.step()  # training goes on, finite
    assert _all_finite(_snapshot(params, optimizer))


def test_nonfinite_raise_names_the_parameter_and_changes_nothing():
    params, optimizer = _setup(nonfinite="raise")
    seeded_grads(params, 0)
    optimizer.step()
    before = _snapshot(params, optimizer)
    seeded_grads(params, 1)
    params[2].grad[0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite gradient in bias"):
        optimizer.step()
    assert_identical(_snapshot(params, optimizer), before)


def test_nonfinite_ignore_lets_the_value_through():
    params, optimizer = _setup(nonfinite="ignore")
    seeded_grads(params, 0)
    params[2].grad[0] = float("nan")
    optimizer.step()
    assert params[2].isnan().any() and optimizer.skipped_steps == 0


def test_unknown_nonfinite_policy_is_refused():
    with pytest.raises(ValueError, match="nonfinite='zero'; expected one of"):
        LowRankOptimizer([nn.Parameter(torch.zeros(2))], nonfinite="zero")


@pytest.mark.parametrize("good_steps", [0, 2], ids=["first-step", "later-refresh"])
def test_failed_refresh_of_one_weight_rolls_back_every_weight(monkeypatch, good_steps):
    params, optimizer = _setup()
    for seed in range(good_steps):
        seeded_grads(params, seed)
        optimizer.step()
    before = _snapshot(params, optimizer)
    refreshes = optimizer.refresh_count
    fit = SVDProjector.fit
    calls = []

    def failing_fit(self, grad, side):
        calls.append(tuple(grad.shape))
        if len(calls) == 2:  # the second weight's SVD
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return fit(self, grad, side)

    monkeypatch.setattr(SVDProjector, "fit", failing_fit)
    seeded_grads(params, 5)
    with pytest.raises(torch.linalg.LinAlgError):
        optimizer.step()
    assert calls == [(12, 8), (6, 10)]
    assert_identical(_snapshot(params, optimizer), before)
    assert optimizer.refresh_count == refreshes
    monkeypatch.setattr(SVDProjector, "fit", fit)
    optimizer.step()  # the same gradients now go through: the first weight refreshes from its old basis
    assert optimizer.refresh_count == refreshes + 2


def test_sparse_gradient_in_a_later_group_changes_nothing():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(8, 6))
    embedding = nn.Embedding(10, 4, sparse=True)
    optimizer = LowRankOptimizer([{"params": [weight], "lowrank": True, "names": ["w"]},
                                  {"params": [embedding.weight], "names": ["embedding.weight"]}], rank=2)
    weight.grad = torch.randn(8, 6)
    embedding(torch.tensor([1, 2])).sum().backward()
    before = _snapshot([weight, embedding.weight], optimizer)
    with pytest.raises(RuntimeError, match=r"sparse gradients \(embedding.weight\)"):
        optimizer.step()
    assert_identical(_snapshot([weight, embedding.weight], optimizer), before)


def test_layerwise_skips_only_the_parameter_with_a_nonfinite_gradient():
    """Layer-wise mode steps each parameter as its gradient arrives: the bad one is skipped
    (and counted), the others are updated as usual."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 4))
    groups = [{"params": [model[0].weight, model[2].weight], "lowrank": True, "names": ["0.weight", "2.weight"]},
              {"params": [model[0].bias, model[2].bias], "names": ["0.bias", "2.bias"]}]
    optimizer = LowRankOptimizer(groups, rank=2, lr=1e-2)
    LayerwiseUpdates(optimizer).attach()
    model[0].weight.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.warns(RuntimeWarning, match="non-finite gradient in 0.weight"):
        model(torch.randn(3, 8)).sum().backward()
    assert torch.equal(model[0].weight, start["0.weight"]) and optimizer.skipped_steps == 1
    assert not optimizer.state[model[0].weight] and model[0].weight not in optimizer.projectors
    for name in ("0.bias", "2.weight", "2.bias"):
        assert not torch.equal(dict(model.named_parameters())[name], start[name]), name


def test_the_policy_of_the_offending_parameters_group_decides():
    torch.manual_seed(0)
    tolerant, strict = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(3))
    optimizer = LowRankOptimizer([{"params": [tolerant], "lowrank": True, "nonfinite": "ignore"},
                                  {"params": [strict], "nonfinite": "raise"}], rank=2)
    tolerant.grad, strict.grad = torch.full((4, 4), float("nan")), torch.ones(3)
    with pytest.raises(torch.linalg.LinAlgError):  # `ignore` lets the NaN reach the SVD, as before
        optimizer.step()
    tolerant.grad, strict.grad = torch.ones(4, 4), torch.full((3,), float("inf"))
    with pytest.raises(FloatingPointError, match="parameter 1"):
        optimizer.step()


def _poison(params, seed, poisoned):
    """Gradients for a step, with a NaN in each of ``poisoned`` (indices into ``params``)."""
    seeded_grads(params, seed)
    for index in poisoned:
        params[index].grad[0] = float("nan")


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_a_nonfinite_weight_is_named_as_such_and_nothing_changes(nonfinite):
    """A NaN weight (fp16 overflow, a faulty update, a corrupted checkpoint) makes every later
    gradient NaN: the step names the weight, not the first NaN gradient, and raises."""
    params, optimizer = _setup(nonfinite=nonfinite)
    seeded_grads(params, 0)
    optimizer.step()
    with torch.no_grad():
        params[1][3, 4] = float("nan")
    before = _snapshot(params, optimizer)
    _poison(params, 1, poisoned=[0, 1, 2])  # the first NaN gradient is first.weight's
    with pytest.raises(FloatingPointError, match=r"weight second.weight is non-finite \(not its gradient\): the "
                                                 r"model is corrupted.*Restore a checkpoint"):
        optimizer.step()
    assert_identical(_snapshot(params, optimizer), before)
    assert optimizer.skipped_steps == 0


def test_a_nonfinite_weight_of_an_ignoring_group_is_not_checked():
    params, optimizer = _setup(nonfinite="ignore")
    with torch.no_grad():
        params[2][0] = float("inf")
    seeded_grads(params, 0)
    optimizer.step()  # `ignore`: no check at all, as documented
    assert params[2].isnan().any() or params[2].isinf().any()


def _skip_until_raised(params, optimizer, bad_steps):
    """Steps with a NaN gradient in second.weight; returns how many were skipped before one raised."""
    skipped = 0
    for seed in range(bad_steps):
        _poison(params, seed, poisoned=[1])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                optimizer.step()
            except FloatingPointError as error:
                assert not caught
                return skipped, str(error)
        assert [str(w.message).split(":")[0] for w in caught] == ["non-finite gradient in second.weight"]
        skipped += 1
    return skipped, None


@pytest.mark.parametrize("bound", [1, 3, 25])
def test_a_run_skipping_more_than_max_consecutive_skips_in_a_row_stops(bound):
    params, optimizer = _setup(max_consecutive_skips=bound)
    before = _snapshot(params, optimizer)
    skipped, error = _skip_until_raised(params, optimizer, bad_steps=bound + 5)
    assert skipped == bound
    assert f"non-finite gradient in second.weight: its update was skipped {bound + 1} times in a row, more than " \
           f"max_consecutive_skips={bound}" in error and "raise max_consecutive_skips (None: no bound)" in error
    assert_identical(_snapshot(params, optimizer), before)  # nothing ever updated


def test_the_default_bound_is_a_few_dozen_and_none_never_stops():
    assert LowRankOptimizer([nn.Parameter(torch.zeros(2))]).defaults["max_consecutive_skips"] == 25
    params, optimizer = _setup(max_consecutive_skips=None)
    skipped, error = _skip_until_raised(params, optimizer, bad_steps=60)
    assert (skipped, error) == (60, None) and optimizer.skipped_steps == 60


def test_a_good_step_resets_the_count():
    params, optimizer = _setup(max_consecutive_skips=2)
    for round_ in range(3):  # 2 skipped, 1 good, three times: never more than 2 in a row
        assert _skip_until_raised(params, optimizer, bad_steps=2) == (2, None)
        seeded_grads(params, 100 + round_)
        optimizer.step()
    assert _skip_until_raised(params, optimizer, bad_steps=3)[0] == 2
    assert optimizer.skipped_steps == 3 * 2 + 3


def test_the_count_survives_a_checkpoint():
    params, optimizer = _setup(max_consecutive_skips=3)
    seeded_grads(params, 0)
    optimizer.step()
    assert _skip_until_raised(params, optimizer, bad_steps=2) == (2, None)
    saved = copy.deepcopy(optimizer.state_dict())
    params_again, again = _setup(max_consecutive_skips=3)
    again.load_state_dict(saved)
    skipped, error = _skip_until_raised(params_again, again, bad_steps=3)
    assert skipped == 1 and "skipped 4 times in a row" in error


def test_a_checkpoint_saved_before_the_option_existed_takes_this_runs_bound():
    params, optimizer = _setup()
    seeded_grads(params, 0)
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    for group in saved["param_groups"]:
        del group["max_consecutive_skips"]
    del saved["skip_streaks"]
    params_again, again = _setup(max_consecutive_skips=2)
    again.load_state_dict(saved)
    assert [group["max_consecutive_skips"] for group in again.param_groups] == [2, 2]
    assert _skip_until_raised(params_again, again, bad_steps=5)[0] == 2


@pytest.mark.parametrize(("value", "error", "match"), [
    (0, ValueError, r"max_consecutive_skips must be >= 1 or None, got 0; set None to never stop.*nonfinite: raise"),
    (-2, ValueError, "max_consecutive_skips must be >= 1 or None"),
    (2.5, TypeError, "max_consecutive_skips must be an integer or None, got 2.5"),
    ("3", TypeError, "max_consecutive_skips must be an integer or None"),
    (True, TypeError, "max_consecutive_skips must be an integer or None, got True"),
])
def test_a_bad_bound_is_refused_when_the_optimizer_is_built(value, error, match):
    with pytest.raises(error, match=match):
        LowRankOptimizer([nn.Parameter(torch.zeros(2))], max_consecutive_skips=value)
    with pytest.raises(error, match=match):  # also per group
        LowRankOptimizer([{"params": [nn.Parameter(torch.zeros(4, 4))], "lowrank": True,
                           "max_consecutive_skips": value}], rank=2)


def test_layerwise_counts_each_parameters_skips_in_a_row():
    """Layer-wise mode: the other parameters' good updates do not reset the count of the one
    whose gradient is always NaN; after max_consecutive_skips skips of it, backward raises."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 4))
    groups = [{"params": [model[0].weight, model[2].weight], "lowrank": True, "names": ["0.weight", "2.weight"]},
              {"params": [model[0].bias, model[2].bias], "names": ["0.bias", "2.bias"]}]
    optimizer = LowRankOptimizer(groups, rank=2, lr=1e-2, max_consecutive_skips=2)
    LayerwiseUpdates(optimizer).attach()
    model[0].weight.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    for _ in range(2):
        with pytest.warns(RuntimeWarning, match="non-finite gradient in 0.weight"):
            model(torch.randn(3, 8)).sum().backward()
    with pytest.raises(FloatingPointError, match="0.weight: its update was skipped 3 times in a row"):
        model(torch.randn(3, 8)).sum().backward()
    assert optimizer.skipped_steps == 3 and not optimizer.state[model[0].weight]


def test_layerwise_names_the_nonfinite_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 4))
    names = [name for name, _ in model.named_parameters()]
    optimizer = LowRankOptimizer([{"params": list(model.parameters()), "names": names}], lr=1e-2)
    LayerwiseUpdates(optimizer).attach()
    with torch.no_grad():
        model[0].weight[1, 1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"weight 0.weight is non-finite \(not its gradient\)"):
        with pytest.warns(RuntimeWarning, match="non-finite gradient"):  # the later layers' NaN gradients first
            model(torch.randn(3, 8)).sum().backward()


def test_build_optimizer_passes_the_bound_to_every_group_with_or_without_a_method():
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 4))
    for method in (None, "galore", "fira"):
        optimizer = build_optimizer(model, method=method, targets=["0", "2"], rank=2, max_consecutive_skips=4)
        assert [group["max_consecutive_skips"] for group in optimizer.param_groups] == [4, 4], method
    with pytest.raises(ValueError, match="max_consecutive_skips must be >= 1 or None"):
        build_optimizer(model, targets=["0"], rank=2, max_consecutive_skips=0)


def test_resuming_with_another_bound_warns_and_uses_this_runs():
    params, optimizer = _setup(max_consecutive_skips=3)
    seeded_grads(params, 0)
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    _, again = _setup(max_consecutive_skips=5)
    with pytest.warns(UserWarning, match=r"param group 1 \(bias, ...\) max_consecutive_skips: 3 -> 5"):
        again.load_state_dict(saved)
    assert [group["max_consecutive_skips"] for group in again.param_groups] == [5, 5]
