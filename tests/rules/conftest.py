"""An in-test inner optimizer with the peers' (HF ``transformers.AdamW``) convention, so that the
update rules can be compared with fira / apollo-torch on identical inputs.

The peers compute ``N = M / (√V + ε)`` without bias correction and multiply the whole update
by ``√(1−β2ᵗ)/(1−β1ᵗ)``; with ``correct_bias=False`` that factor is 1 and ``N`` is exactly
what this inner optimizer returns. lit_lowrank's ``adamw`` returns the bias-corrected
``M̂/(√V̂+ε)`` (the papers' convention), which scales φ and the limiter's history by the
correction factor — the deliberate difference tested against plain references instead.
"""

from __future__ import annotations

import types

import pytest
import torch

from lit_lowrank import InnerOptimizer, hookimpl


class UncorrectedAdam(InnerOptimizer):
    linear_state = ("exp_avg",)
    quadratic_state = ("exp_avg_sq",)

    def __init__(self, betas=(0.9, 0.999), eps=1e-6):
        self.betas, self.eps = betas, eps

    def init_state(self, low):
        return {"exp_avg": torch.zeros_like(low), "exp_avg_sq": torch.zeros_like(low)}

    def directions(self, lows, states, step):
        beta1, beta2 = self.betas
        out = []
        for low, state in zip(lows, states):
            state["exp_avg"].mul_(beta1).add_(low, alpha=1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(low, low, value=1 - beta2)
            out.append(state["exp_avg"] / (state["exp_avg_sq"].sqrt() + self.eps))
        return out


@hookimpl
def register_inner_optimizers(register):
    register("adam-uncorrected", UncorrectedAdam)


@pytest.fixture
def uncorrected_adam(fresh_plugins):
    """Registers ``adam-uncorrected`` for the duration of a test."""
    fresh_plugins.register_plugin(types.SimpleNamespace(register_inner_optimizers=register_inner_optimizers),
                                  name="test-uncorrected-adam")
    return "adam-uncorrected"
