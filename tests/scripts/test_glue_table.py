"""scripts/glue_table.py on CSVLogger files written by the test: the newest version per task,
the best (or last) validation epoch, main scores ×100 and the average over the papers' tasks."""

from __future__ import annotations

import csv
import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "scripts" / "glue_table.py"


def write_metrics(path: Path, rows: list[dict[str, float]]) -> None:
    """A CSVLogger-style file: training rows without validation values interleaved."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = sorted({k for r in rows for k in r} | {"epoch", "step", "train/loss"})
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        for i, row in enumerate(rows):
            writer.writerow({"epoch": i, "step": 10 * i + 5, "train/loss": 0.5})
            writer.writerow({"epoch": i, "step": 10 * i + 9, **row})


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    runs = tmp_path / "glue"
    write_metrics(runs / "cola" / "version_0" / "metrics.csv", [{"val/mcc": 0.10}])  # older version: ignored
    write_metrics(runs / "cola" / "version_1" / "metrics.csv", [{"val/mcc": 0.40}, {"val/mcc": 0.55},
                                                               {"val/mcc": 0.50}])
    write_metrics(runs / "mnli" / "version_0" / "metrics.csv",
                  [{"val_matched/accuracy": 0.80, "val_mismatched/accuracy": 0.81},
                   {"val_matched/accuracy": 0.84, "val_mismatched/accuracy": 0.83}])
    write_metrics(runs / "mrpc" / "version_0" / "metrics.csv",
                  [{"val/f1": 0.90, "val/accuracy": 0.86}, {"val/f1": 0.88, "val/accuracy": 0.87}])
    write_metrics(runs / "wnli" / "version_0" / "metrics.csv", [{"val/accuracy": 0.5634}])
    return runs


def run(argv: list[str], monkeypatch, capsys) -> list[str]:
    monkeypatch.setattr(sys, "argv", ["glue_table.py", *argv])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    return capsys.readouterr().out.splitlines()


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip("|").split("|")]


def test_best_epoch_table(run_dir, monkeypatch, capsys):
    out = run([str(run_dir), "--label", "GaLore"], monkeypatch, capsys)
    header, values = cells(out[0]), cells(out[2])
    assert header == ["", "CoLA", "STS-B", "MRPC", "RTE", "SST-2", "MNLI", "QNLI", "QQP", "WNLI", "Avg"]
    got = dict(zip(header, values))
    assert got[""] == "GaLore"
    assert got["CoLA"] == "55.00" and got["MRPC"] == "90.00" and got["MNLI"] == "84.00/83.00"
    assert got["STS-B"] == "–" and got["WNLI"] == "56.34"
    # WNLI is not averaged: (55 + 90 + 84) / 3
    assert got["Avg"] == f"{(55 + 90 + 84) / 3:.2f} (3 of 8 tasks)"
    assert any(line.startswith("MRPC (epoch 0, step 9)") and "val/accuracy=0.8600" in line for line in out)


def test_last_epoch(run_dir, monkeypatch, capsys):
    got = dict(zip(*(cells(line) for line in run([str(run_dir), "--select", "last"], monkeypatch, capsys)[::2][:2])))
    assert got["CoLA"] == "50.00" and got["MRPC"] == "88.00" and got["MNLI"] == "84.00/83.00"


def test_empty_directory_is_an_error(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit, match="no metrics.csv"):
        run([str(tmp_path)], monkeypatch, capsys)


def test_a_run_folder_without_task_runs_names_the_one_beside_it_that_has_them(tmp_path, monkeypatch, capsys):
    """MiniLM's base config logs to runs/glue_minilm: asking for runs/glue points there."""
    write_metrics(tmp_path / "glue_minilm" / "sst2" / "version_0" / "metrics.csv", [{"val/accuracy": 0.9}])
    write_metrics(tmp_path / "glue_minilm" / "rte" / "version_0" / "metrics.csv", [{"val/accuracy": 0.6}])
    with pytest.raises(SystemExit, match=rf"GLUE runs are in {tmp_path / 'glue_minilm'} \(rte, sst2\): "
                                         rf"python scripts/glue_table.py {tmp_path / 'glue_minilm'}"):
        run([str(tmp_path / "glue")], monkeypatch, capsys)
