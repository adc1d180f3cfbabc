"""The conformance kit (``lit_lowrank.testing``): every registered component passes its check,
and each check fails, naming the problem, on a component that breaks its contract."""

from __future__ import annotations

import pytest
import torch

from lit_lowrank import plugins, testing
from lit_lowrank.inner.adamw import AdamInner
from lit_lowrank.projectors.svd import SVDProjector
from lit_lowrank.quantizers.int import IntQuantizer
from lit_lowrank.rules.galore import GaLoreRule
from lit_lowrank.schedules.fixed import FixedGap

CHECKS = {"projectors": testing.check_projector, "quantizers": testing.check_quantizer,
          "update_rules": testing.check_update_rule, "inner_optimizers": testing.check_inner_optimizer,
          "schedules": testing.check_schedule}
OPTIONS = {("quantizers", "int"): {"bits": 4, "group_size": 16}}
"""Options a component needs to be checked as users run it."""


def registered(kind: str) -> list[str]:
    return sorted(plugins.registered(kind))


@pytest.mark.parametrize("kind", list(CHECKS))
def test_every_registered_component_keeps_its_contract(kind):
    for name in registered(kind):
        CHECKS[kind](plugins.get(kind, name), **OPTIONS.get((kind, name), {}))


class SkewedBasis(SVDProjector):
    """Claims orthonormal bases but scales them by 2."""

    def fit(self, grad, side):
        return tuple(None if basis is None else 2 * basis for basis in super().fit(grad, side))


class LossyQuantizer(IntQuantizer):
    """Drops a packed field's precision when saved: its round trip through torch.save differs."""

    def quantize(self, x):
        packed = super().quantize(x)
        return {**packed, "note": "not a tensor"}


class ForgetfulAdam(AdamInner):
    """Keeps part of its state in a Python attribute the state dict never sees."""

    def directions(self, lows, states, step):
        self.calls = getattr(self, "calls", 0) + 1
        return [direction * self.calls for direction in super().directions(lows, states, step)]


class FrozenRule(GaLoreRule):
    def apply_(self, param, inputs, *, step_size):
        return None


class LateSchedule(FixedGap):
    def should_refresh(self, step):
        return step > 0 and super().should_refresh(step)


@pytest.mark.parametrize("check, component, problem", [
    (testing.check_projector, SkewedBasis, "not orthonormal"),
    (testing.check_quantizer, LossyQuantizer, "dict of tensors"),
    (testing.check_inner_optimizer, ForgetfulAdam, "continues differently"),
    (testing.check_update_rule, FrozenRule, "left the weight unchanged"),
    (testing.check_schedule, LateSchedule, "no refresh at step 0"),
])
def test_a_broken_component_fails_naming_the_problem(check, component, problem):
    with pytest.raises(AssertionError, match=problem):
        check(component)


def test_a_projector_that_drifts_on_resume_fails():
    class Unsaved(SVDProjector):
        """Refreshes with a random sign flip drawn from the global RNG: not reproducible."""

        def fit(self, grad, side):
            sign = torch.randint(0, 2, (1,)).item() * 2 - 1
            return tuple(None if basis is None else sign * basis for basis in super().fit(grad, side))

    with pytest.raises(AssertionError, match="differs from the uninterrupted run"):
        testing.check_projector(Unsaved)


def test_the_kit_leaves_the_registry_as_it_was():
    before = {kind: set(plugins.registered(kind)) for kind in plugins.KINDS}
    testing.check_schedule(FixedGap)
    assert {kind: set(plugins.registered(kind)) for kind in plugins.KINDS} == before
