"""Every registered projector: tensor-only state that round-trips into a fresh projector, and
new basis tensors after each refresh (the optimizer compares old and new bases)."""

from __future__ import annotations

import io

import pytest
import torch

from lit_lowrank import plugins

NAMES = sorted(plugins.registered("projectors"))


SIDES = {name: ("std", "full") if plugins.get_projector(name).projects_tensors else ("std", "reverse_std", "full")
         for name in NAMES}  # a tensor projector projects every mode: one-sided policies are refused


@pytest.mark.parametrize("name, side", [(name, side) for name in NAMES for side in SIDES[name]])
def test_state_dict_round_trip(name, side):
    cls = plugins.get_projector(name)
    grads = [torch.randn(14, 9, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    projector = cls(3, side=side, seed=7)
    for grad in grads:
        before = projector.bases() if projector.refreshes else None
        projector.refresh(grad)
        after = projector.bases()
        if before is not None:  # a refresh makes new tensors; the old ones are left intact
            assert all(a is None or all(a is not b for b in before) for a in after)
    buffer = io.BytesIO()
    torch.save(projector.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    restored = cls(3, side=side, seed=7)
    restored.load_state_dict(state)
    probe = torch.randn(14, 9)
    torch.testing.assert_close(restored.project(probe), projector.project(probe), rtol=0, atol=0)
    low = projector.project(probe)
    torch.testing.assert_close(restored.project_back(low), projector.project_back(low), rtol=0, atol=0)
