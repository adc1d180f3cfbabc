"""Checkpoints of every shipped config include the final step: ``fit`` from configs/demo.yaml
with a ``max_steps`` that is no multiple of the checkpoint interval leaves a checkpoint of its
last step, and resuming from it continues exactly as an uninterrupted run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_lowrank.cli import LowRankCLI, main
from lit_lowrank.data.pretrain import prepare_embedded
from lit_lowrank.lightning import LastStepCheckpoint

CONFIGS = Path(__file__).parents[2] / "configs"
DEMO = CONFIGS / "demo.yaml"
OVERLAYS = {"gradnorm.yaml", "gradnorm_8bit.yaml"}  # layered on a task config, no trainer section
VOCAB = 512


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "lit_lowrank_cache"
    prepare_embedded(path, VOCAB)
    return path


def fit_demo(root: Path, cache_dir: Path, max_steps: int, *extra: str) -> LowRankCLI:
    """``fit --config configs/demo.yaml`` with a 2-layer hidden-32 LLaMA on 4×32-token batches."""
    network = ("{size: tiny, vocab_size: %d, max_seq_len: 32, hidden_size: 32, intermediate_size: 64, "
               "num_heads: 2, num_layers: 2}" % VOCAB)
    return LowRankCLI(args=[
        "fit", "--config", str(DEMO), "--trainer.max_steps", str(max_steps),
        "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
        "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
        "--model.network.init_args", network, "--data.init_args.vocab_size", str(VOCAB),
        "--data.init_args.seq_len", "32", "--data.init_args.batch_size", "4",
        "--data.init_args.cache_dir", str(cache_dir), "--lowrank.rank", "4", "--lowrank.update_gap", "2",
        "--lowrank.warmup", "2", "--lowrank.lr_schedule", "constant", *extra])


def train_losses(cli: LowRankCLI) -> dict[int, float]:
    with open(Path(cli.trainer.logger.log_dir) / "metrics.csv", newline="") as handle:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(handle) if row["train/loss"]}


@pytest.mark.slow
def test_demo_leaves_a_checkpoint_of_its_last_step_and_resumes_from_it(tmp_path, cache_dir):
    full = fit_demo(tmp_path / "full", cache_dir, 6)
    first = fit_demo(tmp_path / "first", cache_dir, 3)  # 3 is no multiple of the config's 100
    (ckpt,) = Path(first.trainer.logger.log_dir, "checkpoints").glob("*.ckpt")
    assert torch.load(ckpt, weights_only=False)["global_step"] == 3
    resumed = fit_demo(tmp_path / "resumed", cache_dir, 6, "--ckpt_path", str(ckpt))
    assert resumed.trainer.global_step == 6
    assert train_losses(first) == pytest.approx({s: v for s, v in train_losses(full).items() if s < 3}, abs=0)
    assert train_losses(resumed) == pytest.approx({s: v for s, v in train_losses(full).items() if s >= 3}, abs=0)


def shipped_configs() -> list[list[Path]]:
    """Every runnable config: each top-level one, and each GLUE task overlay on its model's base."""
    glue = [[CONFIGS / "glue" / f"{p.parent.name}.yaml", p] for p in CONFIGS.glob("glue/*/*.yaml")]
    return sorted([[p] for p in CONFIGS.glob("*.yaml")] + glue)


@pytest.mark.parametrize("configs", shipped_configs(), ids=lambda ps: str(ps[-1].relative_to(CONFIGS)))
def test_every_shipped_config_checkpoints_its_last_step(configs, capsys):
    """The config as the CLI resolves it: checkpointing on, one LastStepCheckpoint, no other
    ModelCheckpoint."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *(arg for path in configs for arg in ("--config", str(path))), "--print_config"])
    assert exit_info.value.code in (0, None)
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert trainer["enable_checkpointing"] is not False
    paths = [c["class_path"] for c in trainer["callbacks"]]
    assert paths.count("lit_lowrank.lightning.LastStepCheckpoint") == 1
    assert not any(path.endswith("ModelCheckpoint") for path in paths)


def test_overlays_have_no_trainer_section():
    for name in OVERLAYS:
        assert "trainer" not in yaml.safe_load((CONFIGS / "glue" / name).read_text())


def test_a_monitor_needs_save_last():
    with pytest.raises(ValueError, match="save_last=True"):
        LastStepCheckpoint(monitor="val/loss")
    assert isinstance(LastStepCheckpoint(monitor="val/loss", save_last=True), ModelCheckpoint)


@pytest.mark.slow
@pytest.mark.parametrize(("top_k", "steps"), [(1, [5]), (-1, [2, 4, 5])])
def test_periodic_checkpoints_plus_the_final_step(tmp_path, top_k, steps):
    from lightning.pytorch import Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    callback = LastStepCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=top_k)
    Trainer(max_steps=5, limit_val_batches=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
            accelerator="cpu", callbacks=[callback]).fit(BoringModel())
    saved = sorted(int(p.stem.split("step=")[1]) for p in tmp_path.glob("*.ckpt"))
    assert saved == steps
