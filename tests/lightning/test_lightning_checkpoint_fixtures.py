"""A Lightning checkpoint written by earlier code resumes bitwise: each ``.ckpt`` of
``tests/fixtures/checkpoints/lightning/`` (a ``Trainer.fit`` of ``LowRankModule`` stopped after a
few steps, written at commit c0979fb by ``make_fixtures.py``) is resumed by today's code with
``fit(ckpt_path=...)`` to the same step count, and the network's weights must equal (``torch.equal``)
those the old code reached resuming the same checkpoint."""

from __future__ import annotations

import pytest
import torch

from checkpoint_fixtures import FIXTURES, fixtures


def test_every_lightning_recipe_has_its_fixture():
    assert sorted(path.stem for path in (FIXTURES / "lightning").glob("*.ckpt")) == sorted(fixtures.LIGHTNING_RECIPES)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(fixtures.LIGHTNING_RECIPES))
def test_old_lightning_checkpoint_resumes_bitwise(name):
    torch.set_num_threads(1)  # the fixtures' reductions ran on one thread
    checkpoint = FIXTURES / "lightning" / f"{name}.ckpt"
    trainer = fixtures.lightning_fit(name, ckpt_path=str(checkpoint))
    assert trainer.global_step == fixtures.SAVED_STEPS + fixtures.RESUMED_STEPS
    resumed = trainer.lightning_module.network.state_dict()
    expected = torch.load(FIXTURES / "lightning" / f"{name}-expected.pt", weights_only=True)
    saved = {key.removeprefix("network."): value
             for key, value in torch.load(checkpoint, weights_only=False)["state_dict"].items()}
    assert resumed.keys() == expected.keys()
    assert any(not torch.equal(saved[key], expected[key]) for key in expected), "the resumed steps changed nothing"
    differing = [key for key in expected if not torch.equal(resumed[key], expected[key])]
    assert not differing, f"{name}: weights differ from the old code's after resuming: {differing}"
