"""``projector_seed``: the random projections a run draws. Each weight's projector is seeded with
its parameter index + projector_seed · 2³², its k-th draw made by NumPy's PCG64 from
``SeedSequence([seed, k])`` (docs/methods.md); 0 keeps the draws of runs before the option."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from lit_lowrank import build_optimizer
from lit_lowrank.lightning import LowRankConfig

RANK = 2


def pair() -> nn.Module:
    """8×16 and 4×8 target weights, the optimizer's parameters 0 and 1 (its low-rank group comes
    first; the biases are dense): ``side: std`` projects their rows."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4))


def stepped(projector_seed: int | None) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = pair()
    options = {} if projector_seed is None else {"projector_seed": projector_seed}
    optimizer = build_optimizer(model, targets=["0", "1"], projector="random", rank=RANK, update_gap=5, **options)
    model(torch.randn(4, 16, generator=torch.Generator().manual_seed(1))).square().mean().backward()
    optimizer.step()
    return model, optimizer


def first_draw(seed: int, rows: int) -> torch.Tensor:
    """The left basis of a std-side random projector's first refresh on a weight of ``rows`` rows:
    an r×rows standard normal draw, transposed, over √r."""
    draw = np.random.default_rng([seed, 0]).standard_normal((RANK, rows), dtype=np.float32)
    return torch.from_numpy(draw).T / math.sqrt(RANK)


@pytest.mark.parametrize("projector_seed", [0, 5, 2**31 - 1])
def test_each_weight_draws_from_its_index_and_the_run_seed(projector_seed):
    model, optimizer = stepped(projector_seed)
    for index, layer in enumerate(model):
        left, right = optimizer.projectors[layer.weight].bases()
        assert right is None
        expected = first_draw(index + projector_seed * 2**32, layer.weight.shape[0])
        assert torch.equal(left, expected)


def test_zero_is_the_default_draw_and_another_seed_trains_other_weights():
    default, _ = stepped(None)
    zero, _ = stepped(0)
    other, _ = stepped(1)
    assert all(torch.equal(a, b) for a, b in zip(default.parameters(), zero.parameters()))
    assert not torch.equal(default[0].weight, other[0].weight)


@pytest.mark.parametrize("value, error, match", [(-1, ValueError, r"in \[0, 2\*\*31\), got -1"),
                                                 (2**31, ValueError, r"in \[0, 2\*\*31\)"),
                                                 (1.5, TypeError, "must be an integer, got 1.5"),
                                                 (True, TypeError, "must be an integer, got True")])
def test_a_bad_seed_is_refused_when_the_optimizer_or_config_is_built(value, error, match):
    with pytest.raises(error, match=match):
        build_optimizer(pair(), targets=["0"], projector="random", rank=RANK, projector_seed=value)
    with pytest.raises(error, match=match):
        LowRankConfig(projector_seed=value)


def test_the_yaml_field_reaches_every_low_rank_group():
    config = LowRankConfig(method="apollo", rank=RANK, projector_seed=7)
    assert config.optimizer_options()["projector_seed"] == 7
    optimizer = build_optimizer(pair(), targets=["0", "1"], **config.optimizer_options())
    assert {group["projector_seed"] for group in optimizer.param_groups if group["lowrank"]} == {7}


def test_a_checkpoint_resumes_only_with_its_own_seed():
    _, saved = stepped(3)
    state = copy.deepcopy(saved.state_dict())
    _, resumed = stepped(3)
    resumed.load_state_dict(state)
    _, other = stepped(4)
    with pytest.raises(ValueError, match=r"saved with projector_seed=3, this optimizer has 4.*Resume with "
                                         r"projector_seed: 3"):
        other.load_state_dict(state)


def test_a_checkpoint_from_before_the_option_resumes_only_with_the_default():
    """Its projectors hold the default draws' seeds: another projector_seed would not apply to them."""
    _, saved = stepped(0)
    state = copy.deepcopy(saved.state_dict())
    for group in state["param_groups"]:
        del group["projector_seed"]
    _, other = stepped(2)
    with pytest.raises(ValueError, match=r"saved with projector_seed=0, this optimizer has 2"):
        other.load_state_dict(copy.deepcopy(state))
    _, default = stepped(None)
    default.load_state_dict(state)
