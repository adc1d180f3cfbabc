"""``scripts/bench_convergence.py``: real (tiny) runs through the CLI path, resumable results, and
the table's ratios computed from the rows."""

from __future__ import annotations

import csv
import math
import shutil

import pytest

from script_loader import loaded_script

pytestmark = pytest.mark.slow  # each test runs the benchmark end to end


@pytest.fixture(scope="module")
def bench():
    yield from loaded_script("bench_convergence")


def test_tiny_sweep_writes_rows_table_and_curves_and_resumes(bench, tmp_path, capsys):
    argv = ["--methods", "adamw", "adamw-split", "--steps", "6", "--jobs", "2", "--out", str(tmp_path)]
    bench.VARIANTS["adamw"] = bench.Variant((3e-3,))
    bench.VARIANTS["adamw-split"] = bench.Variant((1e-2,), split=True)
    bench.main(argv)
    with (tmp_path / "results.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert [(row["variant"], float(row["lr"])) for row in rows] == [("adamw", 3e-3), ("adamw-split", 1e-2)]
    for row in rows:
        assert math.isfinite(float(row["val_loss"])) and float(row["val_ppl"]) == pytest.approx(
            math.exp(float(row["val_loss"])))
        assert float(row["state_bytes"]) > 0
    assert (tmp_path / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| adamw-split |" in (tmp_path / "table.md").read_text()
    capsys.readouterr()
    bench.main(argv)  # everything already there: nothing re-run
    assert "2 runs, 2 already in" in capsys.readouterr().out
    shutil.rmtree(tmp_path / bench.run_name("adamw", 3e-3))  # a clone: the rows without that run's folder
    bench.main(argv)
    assert "2 runs, 1 already in" in capsys.readouterr().out
    with (tmp_path / "results.csv").open() as stream:
        assert [row["variant"] for row in csv.DictReader(stream)] == ["adamw", "adamw-split", "adamw"]
    assert (tmp_path / bench.run_name("adamw", 3e-3)).is_dir()


def test_split_adamw_trains_the_block_weights_at_alpha_lr(bench, tmp_path):
    """The control's optimizer: two AdamW groups, the block linear weights at α·lr."""
    import torch

    captured = {}
    original = torch.optim.AdamW.__init__

    def spy(self, groups, **kwargs):
        captured["groups"] = [dict(group) for group in groups]  # before the LR schedule scales them
        original(self, groups, **kwargs)

    bench.VARIANTS["adamw-split"] = bench.Variant((0.01,), split=True)
    torch.optim.AdamW.__init__ = spy
    try:
        bench.run_one("adamw-split", 0.01, 2, tmp_path)
    finally:
        torch.optim.AdamW.__init__ = original
    targets, rest = captured["groups"]
    assert targets["lr"] == pytest.approx(bench.ALPHA * 0.01) and rest["lr"] == 0.01
    assert len(targets["params"]) == 28  # 4 blocks × 7 linear weights


def test_table_ratios_come_from_the_rows(bench):
    rows = [
        {"variant": "adamw", "lr": "0.001", "val_loss": "5.0", "val_ppl": str(math.exp(5.0)), "state_bytes": "100", "wall_s": "10"},
        {"variant": "adamw", "lr": "0.003", "val_loss": "4.5", "val_ppl": str(math.exp(4.5)), "state_bytes": "100", "wall_s": "11"},
        {"variant": "adamw-split", "lr": "0.01", "val_loss": "4.4", "val_ppl": str(math.exp(4.4)), "state_bytes": "100", "wall_s": "12"},
        {"variant": "galore", "lr": "0.01", "val_loss": "nan", "val_ppl": "nan", "state_bytes": "nan", "wall_s": "1"},
        {"variant": "galore", "lr": "0.02", "val_loss": "4.6", "val_ppl": str(math.exp(4.6)), "state_bytes": "70", "wall_s": "13"},
    ]
    table = bench.markdown_table(rows)
    galore = next(line for line in table.splitlines() if line.startswith("| galore |"))
    cells = [cell.strip() for cell in galore.split("|")[1:-1]]
    assert cells[1] == "0.02 (of 0.01, 0.02)"
    assert float(cells[3]) == pytest.approx(math.exp(4.6 - 4.5), abs=1e-3)  # × the best AdamW, not the first
    assert float(cells[4]) == pytest.approx(math.exp(4.6 - 4.4), abs=1e-3)
    assert float(cells[6]) == pytest.approx(0.7)
