"""Exact resume through ``torch.save`` for every rule and projector of the projection family:
the limiter history, regenerated random matrices and DCT indices come back identical."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from lit_lowrank import LowRankOptimizer
from lit_lowrank.methods import BUILTIN_METHODS

METHODS = {name: method.options for name, method in BUILTIN_METHODS.items()}
"""Every built-in method's optimizer options (their model transforms are tested elsewhere)."""
COMBOS = {
    **METHODS,
    "fira-rsvd": dict(rule="fira", projector="rsvd"),
    "galore-random-orthonormal": dict(projector="random", projector_args={"orthonormal": True}),
    "fira-adaptive-rank": dict(rule="fira", projector="adaptive-rank",
                               projector_args={"tau": 0.5}),
}


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 10)).to(dtype)


def _steps(model, optimizer, batches):
    for batch in batches:
        generator = torch.Generator().manual_seed(batch)
        inputs, targets = torch.randn(8, 16, generator=generator), torch.randn(8, 10, generator=generator)
        dtype = next(model.parameters()).dtype
        inputs, targets = inputs.to(dtype), targets.to(dtype)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()


def _optimizer(model, combo):
    options = {"rank": 4, "update_gap": 2, "lr": 1e-2, "weight_decay": 0.01, **combo}
    matrices = [model[0].weight, model[2].weight]
    rest = [p for p in model.parameters() if all(p is not w for w in matrices)]
    return LowRankOptimizer([{"params": matrices, "lowrank": True}, {"params": rest}], **options)


@pytest.mark.parametrize("combo,dtype", [(c, torch.float32) for c in COMBOS.values()] + [
    ({**METHODS["fira"], "lr": 1.0}, torch.bfloat16),
    ({**METHODS["apollo"], "lr": 1.0}, torch.bfloat16)],
    ids=[*COMBOS, "fira-bf16", "apollo-bf16"])
def test_resume_is_exact(combo, dtype):
    """bf16 too: the limiter's float32 history must not be cast to the parameter's dtype (a
    large lr makes a 0.4% bf16 rounding of it visible in the weights)."""
    straight = _model(dtype)
    straight_optimizer = _optimizer(straight, combo)
    _steps(straight, straight_optimizer, range(7))

    first = _model(dtype)
    first_optimizer = _optimizer(first, combo)
    _steps(first, first_optimizer, range(3))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _model(dtype)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = _optimizer(resumed, copy.deepcopy(combo))
    resumed_optimizer.load_state_dict(saved["optimizer"])
    _steps(resumed, resumed_optimizer, range(3, 7))

    for want, got in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
