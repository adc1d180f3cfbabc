"""A step that fails in its update phase — a plugin's inner optimizer or rule raising, or Ctrl-C
— is undone: weights, moments, step counters, projectors, schedules and the optimizer's counters
are what they were before ``step()`` began, and the same step retried equals that step of a run
that never failed."""

from __future__ import annotations

import copy
import signal

import pytest
import torch
from torch import nn

from lit_lowrank import LowRankOptimizer, build_optimizer
from lit_lowrank.inner.adamw import AdamInner
from lit_lowrank.inner.sgd import SGDInner
from lit_lowrank.optim import lowrank as lowrank_module
from lit_lowrank.transforms.int_weights import quantize_linear_weights
from lit_lowrank.rules.galore import GaLoreRule
from steps import assert_identical, seeded_grads, weights_and_bias


class PluginFailure(RuntimeError):
    """What the failing plugin-like components raise."""


def _setup(**options):
    """Three low-rank weights and a dense bias; update_gap 2: steps 1 and 3 refresh the subspaces."""
    return weights_and_bias({"a.weight": (12, 8), "b.weight": (6, 10), "c.weight": (9, 7)}, **options)


def _everything(params, optimizer):
    """Every value a step may change: weights, the state dict (moments, steps, projectors,
    schedules, counters), the stepped weights and the rank ledger."""
    return ([p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict()),
            [i for i, p in enumerate(params) if p in optimizer.projectors], dict(optimizer.rank_ledger))


PROMISES = {"apply_": "lifts_only", "directions": "fails_only_out_of_memory"}
"""What a component that may fail in ``apply_``/``directions`` cannot declare: these let the
optimizer run it in the step's apply phase (:mod:`lit_lowrank.optim.deferred`), where a failure
is reported, not undone."""


def _fail_on_call(monkeypatch, cls, name, call, error=PluginFailure, after=False):
    """Make ``cls.name`` raise ``error`` on its ``call``-th call (1-based): before doing anything,
    or ``after`` it did its work (its in-place changes made). The class no longer makes the
    promise (:data:`PROMISES`) that it never fails."""
    original, calls = getattr(cls, name), []
    monkeypatch.setattr(cls, PROMISES[name], False)

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == call and not after:
            raise error(f"{cls.__name__}.{name} fails on call {call}")
        result = original(self, *args, **kwargs)
        if len(calls) == call:
            raise error(f"{cls.__name__}.{name} fails on call {call}")
        return result

    monkeypatch.setattr(cls, name, failing)
    return lambda: monkeypatch.setattr(cls, name, original)


def _patch_dense_adamw(monkeypatch, replacement):
    original = lowrank_module.adam_functional
    monkeypatch.setattr(lowrank_module, "adam_functional", lambda *args, **kwargs: replacement(original, *args, **kwargs))
    return lambda: monkeypatch.setattr(lowrank_module, "adam_functional", original)


def _refuse_inputs(original, *args, **kwargs):
    """As torch's fused AdamW refusing its inputs: the step counters are already advanced (its
    ``_foreach_add_``), then its kernel raises before changing a weight or a moment."""
    torch._foreach_add_(args[5], 1)
    raise RuntimeError("_fused_adam_: tensors must be on the same device and dtype")


FAILURES = {
    # the rule raises on the 3rd weight: the first two are already updated
    "rule-3rd-weight": lambda mp: _fail_on_call(mp, GaLoreRule, "apply_", 3),
    "rule-ctrl-c": lambda mp: _fail_on_call(mp, GaLoreRule, "apply_", 3, KeyboardInterrupt),
    # the inner optimizer updates every moment, then raises
    "inner-after-moments": lambda mp: _fail_on_call(mp, AdamInner, "directions", 1, after=True),
    # torch's AdamW on the dense bias refuses its inputs, last, after every low-rank weight was updated
    "dense-adamw-refuses": lambda mp: _patch_dense_adamw(mp, _refuse_inputs),
}


@pytest.mark.parametrize("good_steps", [0, 1, 2], ids=["first-step", "plain-step", "refresh-step"])
@pytest.mark.parametrize("on_refresh", ["keep", "reset", "rotate"])
@pytest.mark.parametrize("failure", list(FAILURES))
def test_failed_update_phase_is_undone_and_the_retry_equals_a_fresh_run(monkeypatch, failure, on_refresh, good_steps):
    params, optimizer = _setup(on_refresh=on_refresh)
    for seed in range(good_steps):
        seeded_grads(params, seed)
        optimizer.step()
    before = _everything(params, optimizer)
    restore = FAILURES[failure](monkeypatch)
    seeded_grads(params, 10)
    with pytest.raises((RuntimeError, KeyboardInterrupt)):
        optimizer.step()
    assert_identical(_everything(params, optimizer), before)

    restore()
    optimizer.step()  # the same gradients, now without the failure
    fresh_params, fresh = _setup(on_refresh=on_refresh)
    for seed in [*range(good_steps), 10]:
        seeded_grads(fresh_params, seed)
        fresh.step()
    assert_identical(_everything(params, optimizer), _everything(fresh_params, fresh))


def _two_dense_groups():
    torch.manual_seed(0)
    weight, bias, scale = nn.Parameter(torch.randn(12, 8)), nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(30))
    optimizer = LowRankOptimizer([{"params": [weight], "lowrank": True}, {"params": [bias], "weight_decay": 0.0},
                                  {"params": [scale]}], rank=3, lr=1e-2, weight_decay=0.1)
    return [weight, bias, scale], optimizer


def test_ctrl_c_during_the_last_dense_update_completes_the_step_then_raises(monkeypatch):
    """A real SIGINT while torch's AdamW updates the largest dense group (the step's last update,
    not copied) is held until the step is complete, then raised."""
    params, optimizer = _two_dense_groups()
    seeded_grads(params, 0)
    optimizer.step()

    def interrupted(original, *args, **kwargs):
        if args[0][0] is params[2]:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C as torch's AdamW of the largest dense group begins
        original(*args, **kwargs)

    restore = _patch_dense_adamw(monkeypatch, interrupted)
    seeded_grads(params, 1)
    with pytest.raises(KeyboardInterrupt):
        optimizer.step()
    restore()
    fresh_params, fresh = _two_dense_groups()
    for seed in (0, 1):
        seeded_grads(fresh_params, seed)
        fresh.step()
    assert_identical(_everything(params, optimizer), _everything(fresh_params, fresh))


def test_ctrl_c_in_an_earlier_dense_group_is_undone(monkeypatch):
    """The smaller dense group is stepped before the last one, with copies: Ctrl-C right after
    its update undoes it, and the low-rank weight's."""
    params, optimizer = _two_dense_groups()
    seeded_grads(params, 0)
    optimizer.step()
    before = _everything(params, optimizer)

    def interrupted(original, *args, **kwargs):
        original(*args, **kwargs)
        if args[0][0] is params[1]:
            raise KeyboardInterrupt

    _patch_dense_adamw(monkeypatch, interrupted)
    seeded_grads(params, 1)
    with pytest.raises(KeyboardInterrupt):
        optimizer.step()
    assert_identical(_everything(params, optimizer), before)


def test_a_failing_dense_inner_optimizer_undoes_the_low_rank_weights_stepped_before_it(monkeypatch):
    """SGD steps the dense group too (``steps_dense``): its second call, for the dense bias,
    fails after the low-rank weights and their momentum were updated."""
    options = dict(inner="sgd", inner_args={"momentum": 0.9})
    params, optimizer = _setup(**options)
    seeded_grads(params, 0)
    optimizer.step()
    before = _everything(params, optimizer)
    restore = _fail_on_call(monkeypatch, SGDInner, "directions", 2, after=True)
    seeded_grads(params, 1)
    with pytest.raises(PluginFailure):
        optimizer.step()
    assert_identical(_everything(params, optimizer), before)
    restore()
    optimizer.step()
    fresh_params, fresh = _setup(**options)
    for seed in (0, 1):
        seeded_grads(fresh_params, seed)
        fresh.step()
    assert_identical(_everything(params, optimizer), _everything(fresh_params, fresh))


def test_refresh_count_and_lazy_schedule_are_undone(monkeypatch):
    params, optimizer = _setup(schedule="lazy", update_gap=1)
    seeded_grads(params, 0)
    optimizer.step()
    before = _everything(params, optimizer)
    refreshes = optimizer.refresh_count
    _fail_on_call(monkeypatch, GaLoreRule, "apply_", 3)
    seeded_grads(params, 1)
    with pytest.raises(PluginFailure):
        optimizer.step()
    assert optimizer.refresh_count == refreshes
    assert_identical(_everything(params, optimizer), before)


class Quantized(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn, self.mlp, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.mlp(torch.tanh(self.attn(x)))))


def _quantized_run(batches):
    torch.manual_seed(0)
    model = Quantized()
    quantize_linear_weights(model, ["attn", "mlp"], bits=8, group_size=64)
    optimizer = build_optimizer(model, targets=["attn", "mlp"], rank=4, update_gap=2, lr=1e-2)
    for batch in batches:
        optimizer.zero_grad()
        model(torch.randn(8, 16, generator=torch.Generator().manual_seed(batch))).square().mean().backward()
        optimizer.step()
    return model, optimizer


def _model_state(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


def test_quantized_weights_are_restored_codes_scales_and_rounding_count(monkeypatch):
    """Q-GaLore's INT8 weights (a ``weight_store``): the failed step re-quantized the first
    weight (new codes, its stochastic-rounding counter advanced); both come back."""
    model, optimizer = _quantized_run([0])
    before = (_model_state(model), copy.deepcopy(optimizer.state_dict()))
    restore = _fail_on_call(monkeypatch, GaLoreRule, "apply_", 2)
    optimizer.zero_grad()
    model(torch.randn(8, 16, generator=torch.Generator().manual_seed(1))).square().mean().backward()
    with pytest.raises(PluginFailure):
        optimizer.step()
    assert_identical((_model_state(model), optimizer.state_dict()), before)
    restore()
    optimizer.step()
    fresh_model, fresh = _quantized_run([0, 1])
    assert_identical((_model_state(model), optimizer.state_dict()), (_model_state(fresh_model), fresh.state_dict()))


def test_received_projections_survive_a_failed_step(monkeypatch):
    """Projected gradients handed over with ``receive`` (a communication hook, CompAct)
    are used by the retried step as by an uninterrupted one."""
    def run(fail):
        torch.manual_seed(0)
        weights = [nn.Parameter(torch.randn(12, 8)) for _ in range(3)]
        optimizer = LowRankOptimizer([{"params": weights, "lowrank": True}], rank=3, projector="random", side="right")
        generator = torch.Generator().manual_seed(0)
        for p in weights:  # the first step refreshes: a random basis, drawn without the gradient
            optimizer.receive(p, torch.randn(12, 3, generator=generator))
        if fail:
            restore = _fail_on_call(monkeypatch, GaLoreRule, "apply_", 3)
            with pytest.raises(PluginFailure):
                optimizer.step()
            restore()
        optimizer.step()
        return _everything(weights, optimizer)

    assert_identical(run(fail=True), run(fail=False))
