"""Training on one's own corpus, as the shipped configs are written: the placeholder bucket and a
missing folder stop in one line before anything starts; a corpus smaller than the validation
interval trains across epochs and validates every ``val_check_interval`` steps."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from lit_lowrank.cli import LowRankCLI, main
from lit_lowrank.data.pretrain import PretrainData, write_splits
from lit_lowrank.data.tokenizer import train_bpe

CONFIGS = Path(__file__).parents[2] / "configs"
VOCAB = 300


def test_the_placeholder_bucket_is_refused_naming_the_fix():
    with pytest.raises(ValueError, match="placeholder 's3://YOUR-BUCKET/c4-t5': tokenize a corpus with "
                                         "scripts/prepare_corpus.py"):
        PretrainData(data_dir="s3://YOUR-BUCKET/c4-t5")


def test_a_missing_local_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is not a folder: prepare it with scripts/prepare_corpus.py"):
        PretrainData(data_dir=str(tmp_path / "nowhere"))


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("llama_*.yaml")))
def test_a_shipped_config_with_the_placeholder_stops_in_one_line(config, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written before the refusal
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / config)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("error: data_dir is the placeholder") and "Traceback" not in "\n".join(error)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_corpus_smaller_than_the_validation_interval_trains_across_epochs(tmp_path):
    documents = [f"line {i}: " + " ".join(f"w{i * j % 23}" for j in range(8)) + "\n" for i in range(30)]
    tokenizer = tmp_path / "tokenizer.json"
    train_bpe(documents, VOCAB).save(str(tokenizer))
    corpus = tmp_path / "corpus"
    write_splits({"train": documents[:12], "val": documents[12:]}, tokenizer, str(corpus), VOCAB)
    network = ("{size: tiny, vocab_size: %d, max_seq_len: 16, hidden_size: 32, intermediate_size: 64, "
               "num_heads: 2, num_layers: 2}" % VOCAB)
    cli = LowRankCLI(args=[
        "fit", "--config", str(CONFIGS / "demo.yaml"), "--trainer.max_steps", "12",
        "--trainer.val_check_interval", "10", "--trainer.limit_val_batches", "1",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false", "--model.network.init_args", network,
        "--data.init_args.data_dir", str(corpus), "--data.init_args.vocab_size", str(VOCAB),
        "--data.init_args.seq_len", "16", "--data.init_args.batch_size", "8", "--lowrank.rank", "4",
        "--lowrank.warmup", "2"])
    batches_per_epoch = len(cli.datamodule.train_dataloader())
    assert batches_per_epoch < 10 and cli.trainer.current_epoch >= 1  # several epochs in 12 steps
    assert cli.trainer.global_step == 12
    with open(Path(cli.trainer.log_dir) / "metrics.csv", newline="") as stream:
        validated = [int(row["step"]) for row in csv.DictReader(stream) if row["val/loss"]]
    assert validated == [9]  # after the 10th optimizer step (steps are logged from 0)
