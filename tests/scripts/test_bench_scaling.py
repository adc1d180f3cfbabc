"""``scripts/bench_scaling.py`` on the tiny LLaMA: rows per size and rank, ratios against the
AdamW row of the same size and rank, the FLOP count written out, CSV and PNG."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

from script_loader import loaded_script

pytestmark = pytest.mark.slow  # each test runs the benchmark end to end


@pytest.fixture(scope="module")
def bench():
    yield from loaded_script("bench_scaling")


def test_tiny_run_writes_rows_csv_and_png(bench, tmp_path, capsys):
    bench.main(["--sizes", "tiny", "--ranks", "8", "16", "--rank-size", "tiny", "--optimizers", "adamw", "galore",
                "--steps", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 2 + 3 * 2  # by size: adamw, galore; by rank: adamw, galore, apollo at 8 and 16
    for line in rows:
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        if cells[3] == "adamw":
            assert cells[5] == "1.00" and cells[7] == "1.000"
    with (tmp_path / "scaling.csv").open() as stream:
        written = list(csv.DictReader(stream))
    assert {row["sweep"] for row in written} == {"size", "rank"} and len(written) == 8
    assert (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"


def test_lowrank_flops_are_two_r_m_n_per_matmul_and_target(bench):
    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Sequential(nn.Linear(6, 10), nn.Linear(10, 6)) for _ in range(2))

    model = Blocks()
    assert bench.lowrank_flops(model, 4, matmuls=2) == 2 * (4 * 4 * 10 * 6 + 4 * 4 * 6 * 10)
    assert bench.lowrank_flops(model, 4, matmuls=1) == 2 * (2 * 4 * 10 * 6 + 2 * 4 * 6 * 10)
    assert bench.lowrank_flops(model, 100, matmuls=2) == 2 * 2 * 4 * 6 * 10 * 6  # clamped to min(m, n) = 6


def test_cuda_without_a_gpu_is_refused(bench):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        bench.main(["--device", "cuda"])
