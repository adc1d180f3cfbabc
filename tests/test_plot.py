"""``python -m lit_lowrank plot``: curves of real runs (two short ``fit`` runs of the demo config,
with validation) overlaid, one line per run in every panel, labelled axes; clear errors."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

from lit_lowrank.cli import LowRankCLI, main
from lit_lowrank.data.pretrain import prepare_embedded
from lit_lowrank.plot import PANELS, plot_runs

DEMO = Path(__file__).parents[1] / "configs" / "demo.yaml"
VOCAB = 512


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """Two 6-step runs (lr 0.01 and 0.002) with validation every 3 steps."""
    root = tmp_path_factory.mktemp("runs")
    cache = root / "cache"
    prepare_embedded(cache, VOCAB)
    network = ("{size: tiny, vocab_size: %d, max_seq_len: 32, hidden_size: 32, intermediate_size: 64, "
               "num_heads: 2, num_layers: 2}" % VOCAB)
    dirs = []
    for lr in ("0.01", "0.002"):
        LowRankCLI(args=[
            "fit", "--config", str(DEMO), "--trainer.max_steps", "6", "--trainer.val_check_interval", "3",
            "--trainer.limit_val_batches", "2", "--trainer.default_root_dir", str(root),
            "--trainer.logger.init_args.save_dir", str(root), f"--trainer.logger.init_args.name=lr{lr}",
            "--trainer.enable_progress_bar", "false", "--model.network.init_args", network,
            "--data.init_args.vocab_size", str(VOCAB), "--data.init_args.seq_len", "32",
            "--data.init_args.batch_size", "4", "--data.init_args.cache_dir", str(cache), "--lowrank.rank", "4",
            "--lowrank.update_gap", "2", "--lowrank.warmup", "2", "--lowrank.lr", lr])
        dirs.append(root / f"lr{lr}")
    return dirs


@pytest.mark.slow
def test_one_line_per_run_in_every_panel_with_labels(runs, tmp_path):
    out = tmp_path / "curves.png"
    figure = plot_runs(runs, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    panels = [ax for ax in figure.axes if ax.get_visible()]
    labels = {PANELS[column] for column in ("train/loss", "val/loss", "val/ppl", "train/lr", "optim/state_bytes",
                                            "optim/refreshes", "optim/skipped_steps")}
    assert {ax.get_ylabel() for ax in panels} == labels
    names = ["galore, lr 0.01", "galore, lr 0.002"]  # from each run's saved config.yaml
    for ax in panels:
        assert ax.get_xlabel() == "step"
        assert [line.get_label() for line in ax.get_lines()] == names
        assert [text.get_text() for text in ax.get_legend().get_texts()] == names
    val = next(ax for ax in panels if ax.get_ylabel() == PANELS["val/loss"])
    with open(runs[0] / "version_0" / "metrics.csv", newline="") as stream:
        logged = [(int(row["step"]), float(row["val/loss"])) for row in csv.DictReader(stream) if row["val/loss"]]
    assert list(zip(*val.get_lines()[0].get_data())) == logged  # the plotted points are the logged ones


@pytest.mark.slow
def test_the_command_writes_the_png(runs, tmp_path, capsys):
    out = tmp_path / "both.png"
    main(["plot", str(runs[0] / "version_0"), str(runs[1]), "--out", str(out)])
    assert out.exists() and f"wrote {out}" in capsys.readouterr().out


@pytest.mark.slow
def test_errors_name_the_problem(runs, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["plot", str(tmp_path / "nowhere")])
    assert "no metrics.csv in" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "metrics.csv").write_text("step,accuracy\n0,0.5\n")
    with pytest.raises(SystemExit):
        main(["plot", str(foreign)])
    error = capsys.readouterr().err
    assert "has no finite value in any of the columns" in error and "['step', 'accuracy']" in error


def test_nan_and_infinite_values_are_dropped_and_an_all_nan_column_gets_no_panel(tmp_path):
    run = tmp_path / "diverged"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch,step,train/loss,val/loss\n0,0,6.5,\n0,1,nan,\n0,2,inf,nan\n0,3,5.5,\n")
    figure = plot_runs([run], tmp_path / "diverged.png")
    [panel] = [ax for ax in figure.axes if ax.get_visible()]
    assert panel.get_ylabel() == PANELS["train/loss"]
    assert list(zip(*panel.get_lines()[0].get_data())) == [(0, 6.5), (3, 5.5)]


def test_csv_errors_name_the_file_and_its_columns(tmp_path):
    no_step = tmp_path / "no_step"
    no_step.mkdir()
    (no_step / "metrics.csv").write_text("epoch,train/loss\n0,6.5\n")
    with pytest.raises(ValueError, match=r"no_step/metrics.csv has no step column; it has \['epoch', 'train/loss'\]"):
        plot_runs([no_step], tmp_path / "x.png")
    all_nan = tmp_path / "all_nan"
    all_nan.mkdir()
    (all_nan / "metrics.csv").write_text("step,train/loss\n0,nan\n")
    with pytest.raises(ValueError, match="all_nan/metrics.csv has no finite value"):
        plot_runs([all_nan], tmp_path / "x.png")


@pytest.mark.slow
def test_without_matplotlib_the_error_names_the_extra(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    with pytest.raises(ModuleNotFoundError, match=r'pip install "lit-lowrank\[plot\]"'):
        plot_runs(runs, tmp_path / "x.png")


@pytest.mark.slow
def test_a_run_that_cannot_be_read_is_skipped_with_a_warning(runs, tmp_path):
    """A version folder without the expected columns (an aborted run) is named and skipped."""
    broken = runs[0] / "version_9"
    broken.mkdir()
    (broken / "metrics.csv").write_text("epoch\n0\n")
    try:
        with pytest.warns(UserWarning, match=r"skipping run .*version_9: .* has no step column"):
            figure = plot_runs(runs, tmp_path / "curves.png")
    finally:
        (broken / "metrics.csv").unlink()
        broken.rmdir()
    panel = next(ax for ax in figure.axes if ax.get_ylabel() == PANELS["train/loss"])
    assert [line.get_label() for line in panel.get_lines()] == ["galore, lr 0.01", "galore, lr 0.002"]
