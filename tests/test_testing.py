"""The conformance kit (``lit_lowrank.testing``): every registered component passes its check,
and each check fails, naming the problem, on a component that breaks its contract or a promise
its flags make."""

from __future__ import annotations

import pytest
import torch

from lit_lowrank import plugins, testing
from lit_lowrank.inner.adafactor import AdafactorInner
from lit_lowrank.inner.adamw import AdamInner
from lit_lowrank.inner.sgd import SGDInner
from lit_lowrank.projectors.base import Side
from lit_lowrank.projectors.random import RandomProjector
from lit_lowrank.projectors.svd import SVDProjector
from lit_lowrank.quantizers.int import IntQuantizer
from lit_lowrank.rules.base import RuleInputs
from lit_lowrank.rules.galore import GaLoreRule
from lit_lowrank.schedules.base import Schedule
from lit_lowrank.schedules.fixed import FixedGap

CHECKS = {"projectors": testing.check_projector, "quantizers": testing.check_quantizer,
          "update_rules": testing.check_update_rule, "inner_optimizers": testing.check_inner_optimizer,
          "schedules": testing.check_schedule}
OPTIONS = {("quantizers", "int"): {"bits": 4, "group_size": 16}}
"""Options a component needs to be checked as users run it."""
BUILTINS = [(kind, name) for kind in CHECKS for name in sorted(plugins.registered(kind))
            if plugins.registered(kind)[name].provider.startswith("lit_lowrank.")]


@pytest.mark.parametrize("kind, name", BUILTINS, ids=[f"{kind}-{name}" for kind, name in BUILTINS])
def test_every_builtin_component_keeps_its_contract(kind, name):
    CHECKS[kind](plugins.get(kind, name), **OPTIONS.get((kind, name), {}))


def test_the_conformance_cases_cover_every_kind():
    assert {kind for kind, _ in BUILTINS} == set(CHECKS)


@pytest.mark.parametrize("quantizer", ["int", IntQuantizer], ids=["by-name", "by-class"])
def test_a_projector_with_a_quantized_basis_is_checked(quantizer):
    testing.check_projector(SVDProjector, quantizer=quantizer, quantizer_args={"bits": 4, "group_size": 16})


# ---------------------------------------------------------------------------- broken components
class SkewedBasis(SVDProjector):
    """Claims orthonormal bases but scales them by 2."""

    def fit(self, grad, side):
        return tuple(None if basis is None else 2 * basis for basis in super().fit(grad, side))


class GrowingRank(SVDProjector):
    """Adds a column at every refresh: the second basis is wider than ``rank``."""

    def fit(self, grad, side):
        extra = self.refreshes
        return tuple(None if basis is None else torch.cat([basis, basis[..., :1].expand(*basis.shape[:-1], extra)], -1)
                     for basis in super().fit(grad, side))


class ShortBasis(SVDProjector):
    """Drops the last row of each basis: its outer dimension no longer matches the matrix."""

    def fit(self, grad, side):
        return tuple(None if basis is None else basis[:-1] for basis in super().fit(grad, side))


class NoBasis(SVDProjector):
    """Its fit returns no basis at all."""

    def fit(self, grad, side):
        return None, None


class MissingSide(SVDProjector):
    """Returns only Q, also when both sides are projected."""

    def fit(self, grad, side):
        return None, super().fit(grad, Side.RIGHT)[1]


class CountingProjector(SVDProjector):
    """Keeps a Python number in its state dict."""

    def state_dict(self):
        return {**super().state_dict(), "count": self.refreshes}


class PeekingRandom(RandomProjector):
    """Declares needs_gradient = False (as random) but flips its draw by the gradient's sign."""

    flip = 1

    def _refresh(self, grad):
        super()._refresh(grad)
        self.flip = -1 if grad.sum() < 0 else 1

    def bases(self):
        return tuple(None if basis is None else self.flip * basis for basis in super().bases())


class StalePreview(RandomProjector):
    """Its preview announces the draw of the refresh after next."""

    def preview(self, like):
        self.refreshes += 1
        try:
            return super().preview(like)
        finally:
            self.refreshes -= 1


class PreviousGradientProjector(SVDProjector):
    """Keeps the gradient of its last refresh (to compare the next one with) as the tensor handed."""

    def __init__(self, rank, **kwargs):
        super().__init__(rank, **kwargs)
        self.previous = torch.zeros(0)

    def _refresh(self, grad):
        super()._refresh(grad)
        self.previous = grad

    def state_dict(self):
        return {**super().state_dict(), "previous": self.previous}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.previous = state["previous"]


class GradientRowsProjector(SVDProjector):
    """Gives as its right basis the transposed first rows of the gradient, kept as a view of it."""

    orthonormal = False

    def __init__(self, rank, **kwargs):
        super().__init__(rank, **kwargs)
        self.rows = torch.zeros(0)

    def _refresh(self, grad):
        super()._refresh(grad)
        self.rows = grad[..., : self.rank, :]

    def bases(self):
        left, right = super().bases()
        return left, None if right is None else self.rows.mT

    def state_dict(self):
        return {**super().state_dict(), "rows": self.rows.clone()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.rows = state["rows"]


class LossyQuantizer(IntQuantizer):
    """Packs a string beside its tensors."""

    def quantize(self, x):
        packed = super().quantize(x)
        return {**packed, "note": "not a tensor"}


class ZeroQuantizer(IntQuantizer):
    """Dequantizes to zeros: within 2·max|x| of anything, and nothing it packs trains."""

    def dequantize(self, packed):
        return torch.zeros_like(super().dequantize(packed))


class ForgetfulAdam(AdamInner):
    """Keeps part of its state in a Python attribute the state dict never sees."""

    def directions(self, lows, states, step):
        self.calls = getattr(self, "calls", 0) + 1
        return [direction * self.calls for direction in super().directions(lows, states, step)]


class FirstDirectionOnly(AdamInner):
    """Returns one direction whatever the number of R: the other weights are never updated."""

    def directions(self, lows, states, step):
        return super().directions(lows, states, step)[:1]


class StepCountingAdam(AdamInner):
    """Keeps its own counter under ``step``, the optimizer's key."""

    def init_state(self, low):
        return {**super().init_state(low), "step": torch.zeros(())}


class NamedAdam(AdamInner):
    """Keeps a string in the per-weight state."""

    def init_state(self, low):
        return {**super().init_state(low), "kind": "adam"}


class RowNormalizedSGD(SGDInner):
    """Claims elementwise, but scales each row of R by its norm."""

    def directions(self, lows, states, step):
        return [d / d.norm(dim=-1, keepdim=True).clamp(min=1e-12) for d in super().directions(lows, states, step)]


class PositionalSGD(SGDInner):
    """Claims elementwise, but weights each entry by its column index."""

    def directions(self, lows, states, step):
        return [d * torch.arange(1, d.shape[-1] + 1, dtype=d.dtype) for d in super().directions(lows, states, step)]


class StackNormalizedSGD(SGDInner):
    """Claims batched but not elementwise; normalizes by the norm of the whole stack."""

    elementwise = False

    def directions(self, lows, states, step):
        return [d / d.norm() for d in super().directions(lows, states, step)]


class MatrixOnlySGD(SGDInner):
    """Claims steps_dense (as SGD) but normalizes each column: a bias (1-D) has none."""

    elementwise = batched = False

    def directions(self, lows, states, step):
        return [d / d.norm(dim=-2, keepdim=True).clamp(min=1e-12) for d in super().directions(lows, states, step)]


class LastRAdam(AdamInner):
    """Keeps the R of its last step in its state as the tensor handed, not a copy."""

    def directions(self, lows, states, step):
        for low, state in zip(lows, states):
            state["last"] = low
        return super().directions(lows, states, step)


class FrozenRule(GaLoreRule):
    def apply_(self, param, inputs, *, step_size):
        return None


class GradientSignRule(GaLoreRule):
    """Declares ``uses_gradient = False`` (as GaLore) but steps along the gradient's sign."""

    def apply_(self, param, inputs, *, step_size):
        param.add_(inputs.grad.sign(), alpha=-step_size)


class GradientScaledRule(GaLoreRule):
    """Declares ``uses_gradient = False`` and reads the gradient when it gets one."""

    def apply_(self, param, inputs, *, step_size):
        super().apply_(param, inputs, step_size=step_size)
        if inputs.grad is not None:
            param.mul_(1 - 1e-3 * inputs.grad.abs().mean())


class StepResettingRule(GaLoreRule):
    """Writes the optimizer's step counter."""

    def apply_(self, param, inputs, *, step_size):
        super().apply_(param, inputs, step_size=step_size)
        inputs.state["step"] = torch.zeros(())


class StackNormalizedRule(GaLoreRule):
    """Claims batched, but scales the step by the norm of the whole stack."""

    def apply_(self, param, inputs, *, step_size):
        lifted = inputs.projector.project_back(inputs.direction)
        param.add_(lifted / lifted.norm(), alpha=-step_size)


class UnsummedNormRule(GaLoreRule):
    """Claims shardable, but normalizes the step by the norm of the rows it holds."""

    batched = False

    def apply_(self, param, inputs, *, step_size):
        lifted = inputs.projector.project_back(inputs.direction)
        param.add_(lifted / lifted.norm(), alpha=-step_size)


class SideReadingRule(GaLoreRule):
    """Claims any_projection (as GaLore) but reads the side to scale a one-sided step."""

    def apply_(self, param, inputs, *, step_size):
        factor = 0.5 if inputs.projector.side == Side.LEFT else 1.0
        super().apply_(param, inputs, step_size=factor * step_size)


class LateSchedule(FixedGap):
    def should_refresh(self, step):
        return step > 0 and super().should_refresh(step)


class StuckSchedule(FixedGap):
    """Takes ``gap`` but never advances: a refresh (an SVD) at every step."""

    def after_refresh(self, step, similarity):
        self.next_refresh = step


class OnceSchedule(Schedule):
    """Takes ``gap`` but never uses it: one refresh, at step 0."""

    def __init__(self, gap=200):
        super().__init__()


class PythonIntSchedule(FixedGap):
    def state_dict(self):
        return {**super().state_dict(), "gap": self.gap}


@pytest.mark.parametrize("check, component, problem", [
    (testing.check_projector, SkewedBasis, "not orthonormal"),
    (testing.check_projector, GrowingRank, "refresh 2: basis Q has 4 columns, wider than rank 3"),
    (testing.check_projector, ShortBasis, "basis Q has 6 rows, but the gradient's n is 7: its outer dimension"),
    (testing.check_projector, NoBasis, "refresh\\(\\) left no basis"),
    (testing.check_projector, MissingSide, "side full.*basis L is missing \\(None\\), but side BOTH projects"),
    (testing.check_projector, CountingProjector, "state_dict\\(\\) holds {'count': 'int'}; it must hold tensors only"),
    (testing.check_projector, PeekingRandom, "needs_gradient = False, but its bases depend on the gradient's values"),
    (testing.check_projector, StalePreview, "refresh 1: needs_gradient = False, but the bases after refresh differ"),
    (testing.check_projector, PreviousGradientProjector, "state_dict\\(\\)\\['previous'\\] shares storage with grad, "
                                                         "the tensor it was handed.*keep a copy: grad.clone\\(\\)"),
    (testing.check_projector, GradientRowsProjector, "bases\\(\\)\\[1\\] shares storage with grad.*keep a copy"),
    (testing.check_quantizer, LossyQuantizer, "dict of tensors"),
    (testing.check_quantizer, ZeroQuantizer, "round trip does not follow its input \\(cosine similarity 0.00"),
    (testing.check_inner_optimizer, ForgetfulAdam, "continues differently"),
    (testing.check_inner_optimizer, FirstDirectionOnly, "directions per step for 5 R: a weight would not be updated"),
    (testing.check_inner_optimizer, StepCountingAdam, "init_state uses the key\\(s\\) \\['step'\\]"),
    (testing.check_inner_optimizer, NamedAdam, "holds str under 'kind'"),
    (testing.check_inner_optimizer, LastRAdam, "state\\['last'\\] shares storage with low.*copy: low.clone\\(\\)"),
    (testing.check_inner_optimizer, RowNormalizedSGD, "column blocks differ from those of the whole"),
    (testing.check_inner_optimizer, PositionalSGD, "depends on its position; set elementwise = False"),
    (testing.check_inner_optimizer, StackNormalizedSGD, "stepped otherwise than the same matrix alone"),
    (testing.check_inner_optimizer, MatrixOnlySGD, "steps_dense = True\\) on a \\(10,\\) gradient: directions failed"),
    (testing.check_update_rule, FrozenRule, "left the weight unchanged"),
    (testing.check_update_rule, GradientSignRule, "uses_gradient = False, but apply_ fails with grad=None"),
    (testing.check_update_rule, GradientScaledRule, "uses_gradient = False, but its step changes with inputs.grad"),
    (testing.check_update_rule, StepResettingRule, "changed state\\['step'\\], the optimizer's step counter"),
    (testing.check_update_rule, StackNormalizedRule, "stepped otherwise than the same weight alone"),
    (testing.check_update_rule, UnsummedNormRule, "split by rows, side std: rows 0..5 are stepped otherwise than in "
                                                  "the whole weight: a norm is not summed"),
    (testing.check_update_rule, SideReadingRule, "declares any_projection = True, but apply_ reads projector.side"),
    (testing.check_schedule, LateSchedule, "no refresh at step 0"),
    (testing.check_schedule, StuckSchedule, "update_gap 3: refreshes at steps \\[0, 1, 2"),
    (testing.check_schedule, OnceSchedule, "never refreshes after step 0"),
    (testing.check_schedule, PythonIntSchedule, "holds {'gap': 'int'}; it must hold tensors only"),
])
def test_a_broken_component_fails_naming_the_problem(check, component, problem):
    with pytest.raises(AssertionError, match=problem):
        check(component)


KEPT = {
    "inputs.grad": lambda param, inputs: inputs.grad,
    "inputs.low": lambda param, inputs: inputs.low[..., :1],  # a view counts as the tensor
    "inputs.direction": lambda param, inputs: inputs.direction,
    "param": lambda param, inputs: param[0],
    "a copy of N": lambda param, inputs: inputs.direction.clone(),
}
"""What :class:`KeepingRule` keeps, by the name of the tensor it comes from."""


class KeepingRule(GaLoreRule):
    """Keeps in its state, nested, ``KEPT[kept]``: a tensor it was handed, a view of one, or a
    copy of ``N``, as declared; otherwise GaLore's step."""

    uses_gradient = True  # KEPT may read G
    lifts_only = False  # and the weight

    def __init__(self, scale=1.0, *, kept="a copy of N"):
        super().__init__(scale)
        self.kept = kept

    def apply_(self, param, inputs, *, step_size):
        super().apply_(param, inputs, step_size=step_size)
        inputs.state["previous"] = {"kept": KEPT[self.kept](param, inputs)}

    def state_layout(self, grad, low, projector):
        kept = KEPT[self.kept](grad, RuleInputs(grad, low, low, projector, {}))
        return {"previous": {"kept": kept.clone()}}


@pytest.mark.parametrize("kept", ["inputs.grad", "inputs.low", "inputs.direction", "param"])
def test_a_rule_keeping_a_tensor_it_was_handed_fails(kept):
    """Layer-wise DDP frees R after the step and the next backward writes G in place: a rule's
    state keeps copies, not the tensors (or views of them) ``apply_`` was handed."""
    problem = f"state\\['previous'\\]\\['kept'\\] shares storage with {kept}, the tensor it was handed"
    with pytest.raises(AssertionError, match=f"{problem}.*keep a copy: {kept}.clone\\(\\)"):
        testing.check_update_rule(KeepingRule, kept=kept)


def test_a_rule_keeping_a_copy_of_what_it_was_handed_passes():
    testing.check_update_rule(KeepingRule, kept="a copy of N")


class WritingGaLoreRule(GaLoreRule):
    """Declares ``lifts_only`` but adds the lifted step to the weight itself."""

    def apply_(self, param, inputs, *, step_size):
        param.add_(inputs.projector.project_back(inputs.direction), alpha=-step_size * self.scale)


class ReadingGaLoreRule(GaLoreRule):
    """Declares ``lifts_only`` but scales its lift by the weight's norm (a whole-matrix norm:
    neither ``batched`` nor ``shardable``)."""

    batched = shardable = False

    def apply_(self, param, inputs, *, step_size):
        inputs.projector.add_back_(param, inputs.direction * param.norm(), alpha=-step_size * self.scale)


@pytest.mark.parametrize("rule, problem", [
    (WritingGaLoreRule, "wrote the weight other than through projector.add_back_"),
    (ReadingGaLoreRule, "holds the NaN of a weight of NaN: apply_ reads the weight"),
], ids=["writes", "reads"])
def test_a_rule_breaking_its_lifts_only_promise_fails(rule, problem):
    """``lifts_only`` lets the optimizer run ``apply_`` last without copying the weight: a rule
    declaring it must write only through ``add_back_`` and never read the weight."""
    with pytest.raises(AssertionError, match=f"lifts_only = True.*{problem}"):
        testing.check_update_rule(rule)


def test_python_numbers_in_per_weight_state_pass_as_the_guide_says():
    """docs/plugins.md: per-weight state may hold Python numbers; they checkpoint and resume."""

    class CountingAdam(AdamInner):
        def init_state(self, low):
            return {**super().init_state(low), "calls": 0}

        def directions(self, lows, states, step):
            for state in states:
                state["calls"] += 1
            return [d * (1 + 1 / (1 + s["calls"])) for d, s in zip(super().directions(lows, states, step), states)]

    testing.check_inner_optimizer(CountingAdam)


def test_a_quantized_basis_far_from_the_unquantized_one_fails():
    class CoarseBases(SVDProjector):
        """Hands out its quantized bases rounded to one decimal: far beyond an INT8 quantizer's error."""

        def bases(self):
            bases = super().bases()
            if self._storage.quantizer is None:
                return bases
            return tuple(None if basis is None else basis.mul(10).round().div(10) for basis in bases)

    with pytest.raises(AssertionError, match="the quantized basis Q is .* beyond twice the quantizer's round-trip"):
        testing.check_projector(CoarseBases, quantizer="int", quantizer_args={"bits": 8})


def test_an_inner_optimizer_that_never_moves_a_weight_fails_the_training_run():
    class Frozen(AdamInner):
        """Directions of the right number and shape, all zero: the weights only decay."""

        def directions(self, lows, states, step):
            return [torch.zeros_like(d) for d in super().directions(lows, states, step)]

    with pytest.raises(AssertionError, match="0.weight was never updated"):
        testing._check_resume("inner", Frozen, {})


def test_adafactor_is_rightly_not_elementwise():
    """Adafactor's factored statistics span rows and columns: the elementwise check would refuse it."""
    Claimed = type("ClaimedAdafactor", (AdafactorInner,), {"elementwise": True})
    with pytest.raises(AssertionError, match="blocks differ from those of the whole"):
        testing._check_elementwise(Claimed, {})


@pytest.mark.slow
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
    testing.check_projector(SVDProjector, quantizer=IntQuantizer, quantizer_args={"bits": 4, "group_size": 16})
    assert {kind: set(plugins.registered(kind)) for kind in plugins.KINDS} == before
