"""The CLI's progress bar: no ``Epoch 0/-2`` on step-bounded runs; a run that disables the bar
or brings its own gets no second one."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

from lit_lowrank.lightning.progress import StepProgressBar


@pytest.mark.parametrize("bounds, description", [
    ({"max_steps": 300}, "Epoch 0 (max_steps 300)"),
    ({"max_epochs": 10}, "Epoch 0/9"),
])
def test_train_description(bounds, description):
    bar = StepProgressBar()
    trainer = pl.Trainer(callbacks=[bar], logger=False, enable_checkpointing=False, **bounds)
    bar.setup(trainer, BoringModel(), "fit")
    assert bar._get_train_description(0).strip() == description


@pytest.mark.slow
def test_the_cli_uses_it_unless_the_run_disables_the_bar(tmp_path):
    from lit_lowrank.cli import LowRankCLI

    common = ["--model.network", "torch.nn.Linear", "--model.network.in_features", "4", "--model.network.out_features",
              "2", "--data", "lightning.pytorch.demos.boring_classes.BoringDataModule", "--trainer.logger", "false",
              f"--trainer.default_root_dir={tmp_path}"]
    with_bar = LowRankCLI(args=common, run=False)
    assert isinstance(with_bar.trainer.progress_bar_callback, StepProgressBar)
    without = LowRankCLI(args=[*common, "--trainer.enable_progress_bar", "false"], run=False)
    assert without.trainer.progress_bar_callback is None
