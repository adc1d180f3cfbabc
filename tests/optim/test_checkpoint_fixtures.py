"""Checkpoints written by earlier code resume bitwise: each fixture of
``tests/fixtures/checkpoints/`` (written at commit c0979fb by ``make_fixtures.py``, which says how)
holds a tiny LLaMA's model and optimizer state after a few steps and the weights that code reached
a few steps later. Today's code loads the state into a model prepared through today's API
(``lit_lowrank.transforms.prepare``/``bind``), resumes the same steps on the same batches and must
reach those weights exactly (``torch.equal``)."""

from __future__ import annotations

import pytest
import torch

from lit_lowrank import build_optimizer
from lit_lowrank import transforms as model_transforms
from lit_lowrank.plugins import get_method
from checkpoint_fixtures import FIXTURES, fixtures


def _resumed(name: str, saved: dict) -> torch.nn.Module:
    """The recipe's model and optimizer built by today's code, loaded from ``saved`` and trained
    the fixture's resumed steps."""
    model = fixtures.tiny_llama()
    recipe = fixtures.RECIPES[name]
    transforms = get_method(recipe["method"]).transforms
    model_transforms.prepare(model, transforms)
    model.load_state_dict(saved["model"])
    optimizer = build_optimizer(model, **recipe, **fixtures.OPTIONS)
    model_transforms.bind(model, transforms, optimizer)
    optimizer.load_state_dict(saved["optimizer"])
    start = fixtures.SAVED_STEPS
    fixtures.train(model, optimizer, range(start, start + fixtures.RESUMED_STEPS))
    return model


def test_every_recipe_has_its_fixture():
    assert sorted(path.stem for path in FIXTURES.glob("*.pt")) == sorted(fixtures.RECIPES)


@pytest.mark.parametrize("name", sorted(fixtures.RECIPES))
def test_old_checkpoint_resumes_bitwise(name):
    torch.set_num_threads(1)  # the fixtures' reductions ran on one thread
    saved = torch.load(FIXTURES / f"{name}.pt", weights_only=True)
    resumed = _resumed(name, saved).state_dict()
    expected = saved["expected"]
    assert resumed.keys() == expected.keys()
    moved = [key for key in expected if not torch.equal(saved["model"][key], expected[key])]
    assert moved, "the fixture's resumed steps changed no weight"
    differing = [key for key in expected if not torch.equal(resumed[key], expected[key])]
    assert not differing, f"{name}: weights differ from the old code's after resuming: {differing}"
