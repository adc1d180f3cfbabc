"""A rule with ``UpdateRule.lifts_only`` (GaLore's) has its weights written last, in the apply
phase of :mod:`lit_lowrank.optim.guard`, without a copy of them — and, with an inner optimizer
that ``fails_only_out_of_memory``, on a step that neither starts nor refreshes a weight, its
moments advanced there too, without a copy of them (:mod:`lit_lowrank.optim.deferred`): the
update is bitwise the one applied at once; a failure before the writes restores weights, moments
and projectors bitwise; Ctrl-C during the writes is held until the step is complete; a failure
inside them (out of memory) is reported as a partly applied step, naming the weights not
written."""

from __future__ import annotations

import copy
import signal

import pytest
import torch
from torch import nn

from lit_lowrank import LowRankOptimizer
from lit_lowrank.optim.deferred import DeferredLifts, HeldBases, LaterUpdates
from lit_lowrank.optim.guard import StepJournal
from lit_lowrank.projectors.base import Projector
from lit_lowrank.rules.fira import FiraRule
from lit_lowrank.rules.galore import GaLoreRule
from steps import assert_identical, seeded_grads, weights_and_bias

SHAPES = {"a.weight": (12, 8), "b.weight": (6, 10), "c.weight": (9, 7)}


def _everything(params, optimizer):
    return [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())


def _recorded_tensors(monkeypatch) -> list[torch.Tensor]:
    """Every tensor a step's journal copies (``StepJournal.tensor``), in order."""
    recorded, original = [], StepJournal.tensor

    def tensor(self, value):
        recorded.append(value)
        original(self, value)

    monkeypatch.setattr(StepJournal, "tensor", tensor)
    return recorded


@pytest.mark.parametrize("rule, copied", [("galore", False), ("fira", True)])
def test_only_weights_of_rules_that_write_them_at_once_are_copied(monkeypatch, rule, copied):
    """GaLore's weights are written last, never copied; Fira's apply reads G and writes the
    weight itself, so its weights are copied before it runs (as every weight was before)."""
    params, optimizer = weights_and_bias(SHAPES, rule=rule)
    recorded = _recorded_tensors(monkeypatch)
    for seed in range(3):
        seeded_grads(params, seed)
        optimizer.step()
    weights = params[:3]
    assert any(value is weight for value in recorded for weight in weights) is copied


def _run(steps, lifts_only=True, coupled=False, **options):
    """``steps`` steps of the three weights and the bias, GaLore's writes deferred or not;
    ``coupled``: torch Adam's coupled L2 on every group (``G + λW`` projected: W read before the writes)."""
    params, optimizer = weights_and_bias(SHAPES, **options)
    for group in optimizer.param_groups:
        group["decoupled_weight_decay"] = not coupled
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GaLoreRule, "lifts_only", lifts_only)
        for seed in range(steps):
            seeded_grads(params, seed)
            optimizer.step()
    return _everything(params, optimizer)


@pytest.mark.parametrize("options", [
    {}, {"side": "right"}, {"side": "full"}, {"inner": "adamw-hf"}, {"inner": "sgd", "inner_args": {"momentum": 0.9}},
    {"on_refresh": "rotate"}, {"projector": "random"}, {"coupled": True},
], ids=["left", "right", "two-sided", "decay-after", "sgd-dense", "rotate", "random", "coupled-l2"])
def test_deferred_writes_equal_the_update_applied_at_once(options):
    """The same four steps (two refreshes), with GaLore's weights written last or at once (the
    rule run on the weight itself, as for a rule without ``lifts_only``): bitwise the same."""
    assert_identical(_run(4, **options), _run(4, lifts_only=False, **options))


def _two_groups():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(12, 8)), nn.Parameter(torch.randn(10, 6)), nn.Parameter(torch.randn(6))]
    optimizer = LowRankOptimizer([{"params": [params[0]], "lowrank": True},
                                  {"params": [params[1]], "lowrank": True, "rule": "fira"},
                                  {"params": [params[2]]}], rank=3, update_gap=2, lr=1e-2, weight_decay=0.1)
    return params, optimizer


class Failure(RuntimeError):
    pass


@pytest.mark.parametrize("good_steps", [1, 2], ids=["plain-step", "refresh-step"])
def test_a_failure_after_the_lifts_are_recorded_restores_everything(monkeypatch, good_steps):
    """GaLore's group is computed (on the refresh step its moments advanced and its lifts
    recorded; on the plain step its moment update left for the apply phase), then the Fira
    group's rule fails: nothing was written, and the moments, steps and projectors come back
    bitwise."""
    params, optimizer = _two_groups()
    for seed in range(good_steps):
        seeded_grads(params, seed)
        optimizer.step()
    before = _everything(params, optimizer)
    written = []
    monkeypatch.setattr(DeferredLifts, "write", lambda self: written.append(self))
    monkeypatch.setattr(LaterUpdates, "write", lambda self: written.append(self) or iter(()))

    def fail(self, param, inputs, *, step_size):
        raise Failure("fira fails")

    monkeypatch.setattr(FiraRule, "apply_", fail)
    seeded_grads(params, 5)
    with pytest.raises(Failure):
        optimizer.step()
    assert written == []
    assert_identical(_everything(params, optimizer), before)


def _patch_lifts(monkeypatch, lift):
    """Route every lift of the apply phase (recorded ones, and the rule's own there) through
    ``lift(original, *args)``; returns the calls made."""
    calls, original = [], Projector.add_back_

    def patched(*args, **kwargs):
        calls.append(args)
        return lift(original, len(calls), *args, **kwargs)

    monkeypatch.setattr(Projector, "add_back_", patched)
    monkeypatch.setattr(HeldBases, "add_back_", patched)
    return calls


def _fresh_run(seeds):
    params, optimizer = weights_and_bias(SHAPES)
    for seed in seeds:
        seeded_grads(params, seed)
        optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("good_steps", [1, 2], ids=["plain-step", "refresh-step"])
def test_ctrl_c_while_the_weights_are_written_completes_the_step_then_raises(monkeypatch, good_steps):
    """A real SIGINT as the first weight is written is held: every weight gets its update (the
    step equals an uninterrupted one), then KeyboardInterrupt is raised."""
    params, optimizer = _fresh_run(range(good_steps))

    def interrupted(original, call, *args, **kwargs):
        if call == 1:
            signal.raise_signal(signal.SIGINT)
        return original(*args, **kwargs)

    calls = _patch_lifts(monkeypatch, interrupted)
    seeded_grads(params, good_steps)
    with pytest.raises(KeyboardInterrupt):
        optimizer.step()
    assert len(calls) == 3
    monkeypatch.undo()
    fresh_params, fresh = _fresh_run(range(good_steps + 1))
    assert_identical(_everything(params, optimizer), _everything(fresh_params, fresh))


@pytest.mark.parametrize("good_steps", [1, 2], ids=["plain-step", "refresh-step"])
def test_out_of_memory_while_writing_reports_a_partly_applied_step(monkeypatch, good_steps):
    """The one failure the apply phase does not undo: the second weight's write runs out of
    memory (after its decay). The first weight keeps its update, the third its values, and the
    error names the weights whose update was not written in full."""
    params, optimizer = _fresh_run(range(good_steps))
    before = [p.detach().clone() for p in params]
    fresh_params, _ = _fresh_run(range(good_steps + 1))

    def out_of_memory(original, call, *args, **kwargs):
        if call == 2:
            raise torch.OutOfMemoryError("out of memory")
        return original(*args, **kwargs)

    _patch_lifts(monkeypatch, out_of_memory)
    seeded_grads(params, good_steps)
    with pytest.raises(RuntimeError, match=r"partly applied.*not written in full: b\.weight, c\.weight\. Resume"):
        optimizer.step()
    assert_identical(params[0].detach(), fresh_params[0].detach())
    assert_identical(params[2].detach(), before[2])


def test_a_plain_step_copies_no_moment(monkeypatch):
    """GaLore with Adam on a step that neither starts nor refreshes a weight: the journal copies
    the step counters only (0-dim), no moment and no weight; on a refresh step the moments are
    copied (a refresh may rotate or reset them)."""
    params, optimizer = weights_and_bias(SHAPES)
    seeded_grads(params, 0)
    optimizer.step()
    copied = _recorded_tensors(monkeypatch)
    entries, original_entry = [], StepJournal.entry
    monkeypatch.setattr(StepJournal, "entry", lambda self, mapping, key: (entries.append(key),
                                                                           original_entry(self, mapping, key)))
    seeded_grads(params, 1)
    optimizer.step()
    assert all(tensor.ndim == 0 for tensor in copied) and len(copied) >= 3
    assert not any(key is weight for key in entries for weight in params[:3])
    seeded_grads(params, 2)
    optimizer.step()  # refreshes
    assert sum(key is weight for key in entries for weight in params[:3]) == 3
