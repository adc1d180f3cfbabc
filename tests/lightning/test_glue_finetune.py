"""Fine-tuning the shipped MiniLM with GaLore (rank 8) through LowRankModule on a small,
clearly separable sentiment set the test writes in SST-2's TSV layout: accuracy on held-out
sentences (other subjects, other adjectives) ends far above chance. Also: every GLUE config
parses, and mismatched label counts are refused."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from lit_lowrank import LowRankOptimizer
from lit_lowrank.cli import main as cli_main
from lit_lowrank.data.glue import GLUEDataModule
from lit_lowrank.lightning import LowRankConfig, LowRankModule
from lit_lowrank.lightning.glue import GLUEClassification
from lit_lowrank.metrics.glue import GLUE_TASKS
from lit_lowrank.models.sequence_classifier import SequenceClassifier

GLUE_CONFIGS = Path(__file__).parents[2] / "configs" / "glue"
CONFIGS = [GLUE_CONFIGS / model / f"{task}.yaml" for model in ("roberta", "minilm") for task in GLUE_TASKS]
"""Task overlays, each layered on its model's base config (configs/glue/<model>.yaml)."""

TRAIN_WORDS = {1: ["wonderful", "brilliant", "delightful", "excellent", "moving", "superb"],
               0: ["terrible", "boring", "awful", "dreadful", "dull", "horrible"]}
HELDOUT_WORDS = {1: ["fantastic", "charming", "beautiful", "great"],
                 0: ["painful", "tedious", "bad", "disappointing"]}
TRAIN_SUBJECTS = ["the movie", "this film", "the story", "the acting", "the soundtrack", "the ending"]
HELDOUT_SUBJECTS = ["the plot", "the cast", "this picture", "the script"]
TEMPLATES = ["{s} was {w} .", "i found {s} {w} .", "{s} is truly {w}",  # train
             "honestly , {s} felt {w} .", "{s} turned out to be {w} ."]  # held out


def sentences(subjects: list[str], words: dict[int, list[str]], templates: list[str]) -> list[tuple[str, int]]:
    return [(t.format(s=s, w=w), label) for label, ws in words.items()
            for s, w, t in itertools.product(subjects, ws, templates)]


def write_sst2(root: Path) -> Path:
    """SST-2's layout: ``SST-2/{train,dev}.tsv`` with header ``sentence<TAB>label``."""
    folder = root / "SST-2"
    folder.mkdir(parents=True)
    splits = {"train.tsv": sentences(TRAIN_SUBJECTS, TRAIN_WORDS, TEMPLATES[:3]),
              "dev.tsv": sentences(HELDOUT_SUBJECTS, HELDOUT_WORDS, TEMPLATES[3:])}
    for name, rows in splits.items():
        (folder / name).write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    return root


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine two OpenMP threads contend (an SVD of a
    1536×384 gradient took 10 s instead of 0.1 s under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_minilm_galore_learns_held_out_sentiment(tmp_path, one_thread):
    pl.seed_everything(0)
    data = GLUEDataModule("sst2", data_dir=str(write_sst2(tmp_path)), max_seq_length=16, batch_size=16,
                          eval_batch_size=64)
    config = LowRankConfig(rank=8, update_gap=20, scale=2.0, lr=2e-4, warmup=3, min_lr_ratio=0.1,
                           targets=["query", "key", "value", "intermediate.dense", "output.dense"])
    module = LowRankModule(SequenceClassifier(num_labels=2), GLUEClassification("sst2"), config)
    trainer = pl.Trainer(max_steps=30, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    after = trainer.callback_metrics["val/accuracy"].item()

    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, LowRankOptimizer)
    assert trainer.callback_metrics["optim/refreshes"].item() == 36 * 2  # 6 layers × 6 linears, steps 0 and 20
    assert len(data.datasets["validation"]) == 64 and len(data.datasets["train"]) == 216
    assert after >= 0.85, f"held-out accuracy {after:.3f}"


@pytest.mark.slow
def test_label_count_mismatch_is_refused(tmp_path):
    data = GLUEDataModule("sst2", data_dir=str(write_sst2(tmp_path)), max_seq_length=8)
    module = LowRankModule(SequenceClassifier(num_labels=3), GLUEClassification("sst2"), LowRankConfig(rank=4))
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="num_labels disagree"):
        trainer.fit(module, datamodule=data)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_glue_configs_parse(config, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lit_lowrank"])
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(GLUE_CONFIGS / f"{config.parent.name}.yaml"), "--config", str(config),
                  "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["class_path"] == "lit_lowrank.data.glue.GLUEDataModule"
    task = config.stem
    assert printed["data"]["init_args"]["task"] == printed["model"]["task"]["init_args"]["task"] == task
    assert printed["trainer"]["logger"]["init_args"]["name"] == task
    num_labels = {"stsb": 1, "mnli": 3}.get(task, 2)  # regression, three classes, two classes
    assert printed["model"]["network"]["init_args"]["num_labels"] == num_labels


def test_method_overlay_parses(capsys, monkeypatch):
    """A method config layered over a task config (GradNormLoRP over RoBERTa SST-2)."""
    monkeypatch.setattr(sys, "argv", ["lit_lowrank"])
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(GLUE_CONFIGS / "roberta.yaml"), "--config", str(GLUE_CONFIGS / "roberta" / "sst2.yaml"),
                  "--config", str(GLUE_CONFIGS / "gradnorm.yaml"), "--print_config"])
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["lowrank"]["transforms"] == {"weight-norm": {}}
    assert "task: sst2" in printed and "lr: 2.0e-05" in printed
