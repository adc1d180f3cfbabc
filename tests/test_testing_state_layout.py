"""The conformance kit checks that an update rule declares, in ``state_layout``, the tensors its
``apply_`` keeps: what the summary and the memory estimator count of its state."""

from __future__ import annotations

import pytest
import torch

from lit_lowrank import UpdateRule
from lit_lowrank.testing import check_update_rule


class RowNormRule(UpdateRule):
    """GaLore's update, keeping the rows' gradient norms (float32, m values)."""

    def apply_(self, param, inputs, *, step_size):
        inputs.state["row_norm"] = torch.linalg.vector_norm(inputs.grad.float(), dim=1)
        inputs.projector.add_back_(param, inputs.direction, alpha=-step_size * self.scale)


class DeclaredRowNormRule(RowNormRule):
    def state_layout(self, grad, low, projector):
        return {"row_norm": torch.linalg.vector_norm(grad.float(), dim=1)}


class MisdeclaredRowNormRule(RowNormRule):
    """Declares the columns' norms (n values) instead of the rows'."""

    def state_layout(self, grad, low, projector):
        return {"row_norm": torch.linalg.vector_norm(grad.float(), dim=0)}


def test_a_declared_rule_state_passes():
    check_update_rule(DeclaredRowNormRule)


@pytest.mark.parametrize("rule", [RowNormRule, MisdeclaredRowNormRule], ids=["undeclared", "misdeclared"])
def test_an_undeclared_or_misdeclared_rule_state_is_named(rule):
    with pytest.raises(AssertionError, match="state_layout declares .* but apply_ keeps .*row_norm"):
        check_update_rule(rule)
