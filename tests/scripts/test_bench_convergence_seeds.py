"""``scripts/bench_convergence.py --seed``: the seed reaches the run, results.csv gains a seed
column (older rows: the default seed), and the table, curves and the docs' generated table show a
row per seed where a variant has several, with the seed-to-seed spread computed from the rows."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest

from script_loader import loaded_script

ROOT = Path(__file__).parents[2]
LOSSES = {("galore", 0): 4.45, ("galore", 1): 4.43, ("galore-warm", 0): 4.46, ("galore-warm", 1): 4.50}


@pytest.fixture(scope="module")
def bench():
    yield from loaded_script("bench_convergence")


def row(variant: str, lr: float, loss: float, seed: int | None) -> dict[str, str]:
    fields = {"variant": variant, "lr": str(lr), "steps": "300", "val_loss": str(loss), "val_ppl": str(math.exp(loss)),
              "state_bytes": "70", "wall_s": "10"}
    return fields if seed is None else {**fields, "seed": str(seed)}


def rows_with_seeds() -> list[dict[str, str]]:
    """AdamW's references without a seed column (old rows), GaLore and GaLore-warm at two seeds."""
    return [row("adamw", 3e-3, 5.0, None), row("adamw-split", 3e-3, 4.7, None), row("galore", 1e-2, 4.6, None),
            *(row(variant, 2e-2, loss, seed) for (variant, seed), loss in LOSSES.items())]


def cells(table: str, name: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.split("|")[1:-1]]


def test_the_seed_and_the_schedule_option_reach_the_run(bench, tmp_path):
    args = bench.cli_args("galore-stagger", 0.02, 300, tmp_path, 1)
    assert "--seed_everything=1" in args and "--lowrank.schedule_args={stagger: true}" in args
    assert f"--trainer.logger.init_args.name={bench.run_name('galore-stagger', 0.02, 1)}" in args
    assert bench.run_name("galore", 0.02) == "galore_lr0.02"  # the default seed keeps the runs' old names
    assert bench.run_name("galore", 0.02, 1) != bench.run_name("galore", 0.02)
    assert "--seed_everything=0" in bench.cli_args("galore-warm", 0.02, 300, tmp_path)


def test_an_old_results_file_gains_the_seed_column_with_the_default_seed(bench, tmp_path):
    path = tmp_path / "results.csv"
    old = [row("adamw", 3e-3, 5.0, None), row("galore", 2e-2, 4.45, None)]
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(old[0]))
        writer.writeheader()
        writer.writerows(old)
    bench.append_row(path, row("galore", 2e-2, 4.47, 1))
    with path.open() as stream:
        found = list(csv.DictReader(stream))
    assert [(r["variant"], r["val_loss"], r["seed"]) for r in found] == [
        ("adamw", "5.0", "0"), ("galore", "4.45", "0"), ("galore", "4.47", "1")]


def test_table_has_a_row_per_seed_and_the_spread_from_the_rows(bench):
    table = bench.markdown_table(rows_with_seeds())
    assert "| adamw |" in table and "| adamw (seed" not in table  # one seed: no seed shown
    for (variant, seed), loss in LOSSES.items():
        assert float(cells(table, f"{variant} (seed {seed})")[2]) == pytest.approx(math.exp(loss), abs=0.05)
    galore_mean = (LOSSES["galore", 0] + LOSSES["galore", 1]) / 2
    warm_mean = (LOSSES["galore-warm", 0] + LOSSES["galore-warm", 1]) / 2
    spread_rows = table[table.index("val loss by seed"):]
    galore, warm = cells(spread_rows, "galore"), cells(spread_rows, "galore-warm")
    assert float(galore[4]) == pytest.approx(abs(LOSSES["galore", 0] - LOSSES["galore", 1]), abs=1e-4)
    assert float(galore[5]) == pytest.approx(0.0, abs=1e-4)
    assert float(warm[3]) == pytest.approx(warm_mean, abs=1e-4)
    assert float(warm[5]) == pytest.approx(warm_mean - galore_mean, abs=1e-4)
    assert "val loss by seed" not in bench.markdown_table(rows_with_seeds()[:3])  # one seed each: no spread


def test_curves_of_runs_without_their_folder_come_from_the_previous_curves(bench, tmp_path):
    with (tmp_path / "curves.csv").open("w", newline="") as stream:  # the committed file, before the seed column
        csv.writer(stream).writerows([["variant", "lr", "step", "val_loss"], ["galore", "0.02", "49", "6.0"],
                                      ["galore", "0.02", "99", "5.0"]])
    best = {"galore (seed 0)": row("galore", 0.02, 5.0, 0), "galore (seed 1)": row("galore", 0.02, 5.1, 1)}
    curves = bench.write_curves(best, tmp_path)
    assert curves == {"galore (seed 0)": [(49, 6.0), (99, 5.0)]}  # seed 1 has neither a folder nor a curve
    assert bench.read_curves(tmp_path / "curves.csv") == {("galore", 0.02, 0): [(49, 6.0), (99, 5.0)]}


def test_the_docs_table_shows_each_seed_and_the_spread(monkeypatch):
    spec = importlib.util.spec_from_file_location("docs_hooks_generate", ROOT / "docs" / "hooks" / "generate.py")
    hooks = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = hooks
    spec.loader.exec_module(hooks)
    monkeypatch.setattr(hooks, "read_csv", lambda path: rows_with_seeds())
    table = hooks.convergence_table()
    assert cells(table, "galore (seed 0)")[1] == "0.02 (of 0.01, 0.02)"
    assert float(cells(table, "galore-warm (seed 1)")[2]) == pytest.approx(math.exp(LOSSES["galore-warm", 1]), abs=0.05)
    assert float(cells(table[table.index("val loss by seed"):], "galore-warm")[4]) == pytest.approx(
        abs(LOSSES["galore-warm", 0] - LOSSES["galore-warm", 1]), abs=1e-4)
    assert hooks.seed_of(hooks.best_convergence_rows()["galore"]) == "0"  # the methods reference: the default seed's
