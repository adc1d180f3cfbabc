"""Trajectory parity with the peer package galore-torch (skipped where it is not installed).

Deliberate differences, neutralised here and tested against the plain reference in
test_lowrank.py: ε is added to the bias-corrected √V̂ (paper, torch.optim.AdamW) rather than
to √V (galore-torch), so ε is made negligible; decoupled weight decay is applied before the step
(torch.optim.AdamW) rather than after it, so weight_decay = 0. ``inner="adamw-hf"`` takes the
peers' convention instead: tests/inner/test_adamw_hf.py reproduces their runs at their defaults.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_lowrank import LowRankOptimizer

galore_torch = pytest.importorskip("galore_torch")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 40), nn.Tanh(), nn.Linear(40, 12), nn.Tanh(), nn.Linear(12, 3))


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_trajectory_matches_galore_torch(proj_type, assert_same_trajectory):
    ours_model, peer_model = _mlp(), _mlp()
    options = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-12, weight_decay=0.0)
    matrices = lambda model: [model[0].weight, model[2].weight]  # noqa: E731
    others = lambda model: [p for p in model.parameters() if all(p is not w for w in matrices(model))]  # noqa: E731
    ours = LowRankOptimizer(
        [{"params": matrices(ours_model), "lowrank": True}, {"params": others(ours_model)}],
        rank=4, update_gap=3, scale=0.25, side=proj_type, **options,
    )
    peer = galore_torch.GaLoreAdamW(
        [{"params": others(peer_model)},
         {"params": matrices(peer_model), "rank": 4, "update_proj_gap": 3, "scale": 0.25, "proj_type": proj_type}],
        no_deprecation_warning=True, **options,
    )
    assert_same_trajectory(ours_model, ours, peer_model, peer, outputs=3)
