"""Convergence per method: the demo LLaMA pretrained with AdamW and every method of the README's
table, same seed, data order and token budget, through the library's own CLI path.

    python scripts/bench_convergence.py --quick               # a representative subset: 9 min on 2 cores
    python scripts/bench_convergence.py                       # every method: the README's table
    python scripts/bench_convergence.py --methods adamw galore --steps 100

Each configuration is ``python -m lit_lowrank fit --config configs/demo.yaml`` (hidden 128, 4
layers, 16 × 128 tokens per step on the embedded Shakespeare corpus) with ``--lowrank.method``
and ``--lowrank.lr`` set, run in its own process with one thread; the method's own settings
(APOLLO's α = 1, APOLLO-Mini's rank 1) replace the demo's rank 32 / α 0.25 / T 50 where it sets
them. AdamW, the controls and the methods with their own update (GaLore, Fira, APOLLO,
APOLLO-Mini, SNSM, subset-norm Adam, Adafactor, Lion) and the projections that are not an SVD of
G (random, online PCA) get a small learning-rate sweep around the papers' lr; GaLore's other
projector and storage variants run at GaLore's best lr. The best run by final validation loss is
reported; a best lr at the edge of its sweep got the next value added.

The low-rank methods train the projected weights at α·lr and everything else at lr. Two
controls separate that learning-rate split from the projection itself: ``adamw-split`` is plain
AdamW with the same per-group split (the block linear weights at α·lr), and
``galore-full-rank`` is GaLore at rank min(m, n), which projects nothing away.

Results go to ``--out`` (``bench/convergence``): ``results.csv`` (one row per run, appended, so an
interrupted sweep resumes where it stopped), ``curves.csv`` (validation loss by step),
``table.md`` and ``val_loss.png`` (the best run of each method).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo.yaml"
ALPHA = 0.25  # the demo's scale α


@dataclass(frozen=True)
class Variant:
    """One line of the table: how to run it and the learning rates swept."""

    lrs: tuple[float, ...]
    method: str | None = None  # a registered method; None: plain AdamW
    split: bool = False  # AdamW with the block linear weights at α·lr
    full_rank: bool = False  # the method at rank min(m, n)


GALORE_BEST = (2e-2,)  # GaLore's best of its sweep on this model: its projector and inner variants run there
VARIANTS: dict[str, Variant] = {
    "adamw": Variant((1e-3, 3e-3, 1e-2)),
    "adamw-split": Variant((1e-3, 3e-3, 1e-2, 2e-2), split=True),
    "galore": Variant((3e-3, 1e-2, 2e-2, 4e-2), method="galore"),
    "galore-full-rank": Variant((1e-3, 3e-3, 1e-2), method="galore", full_rank=True),
    "fira": Variant((5e-3, 1e-2, 2e-2), method="fira"),
    "apollo": Variant((5e-3, 1e-2, 2e-2), method="apollo"),
    "apollo-mini": Variant((1e-3, 3e-3, 1e-2, 2e-2), method="apollo-mini"),
    "snsm": Variant((3e-3, 1e-2, 3e-2, 1e-1), method="snsm"),
    "galore-sn": Variant((1e-2, 3e-2, 1e-1, 3e-1), method="galore-sn"),
    "galore-adafactor": Variant((3e-3, 1e-2, 2e-2), method="galore-adafactor"),
    "galore-lion": Variant((1e-3, 3e-3, 1e-2, 2e-2), method="galore-lion"),
    "galore-rsvd": Variant(GALORE_BEST, method="galore-rsvd"),
    "galore-dct": Variant(GALORE_BEST, method="galore-dct"),
    "galore-random": Variant((2e-3, 5e-3, 1e-2, 2e-2), method="galore-random"),
    "online-pca": Variant((5e-3, 1e-2, 2e-2), method="online-pca"),
    "adaptive-rank": Variant(GALORE_BEST, method="adaptive-rank"),
    "galore-8bit": Variant(GALORE_BEST, method="galore-8bit"),
    "q-galore": Variant(GALORE_BEST, method="q-galore"),
    "gradnorm": Variant(GALORE_BEST, method="gradnorm"),
}
"""Every method of the README's table, and the two controls; the registry supplies the settings."""
QUICK = {"adamw": (3e-3,), "adamw-split": (1e-2,), "galore": (1e-2,), "galore-full-rank": (1e-2,),
         "fira": (1e-2,), "apollo": (1e-2,)}
FIELDS = ["variant", "lr", "steps", "val_loss", "val_ppl", "state_bytes", "wall_s"]


# ---------------------------------------------------------------------------- one run
def cli_args(name: str, lr: float, steps: int, out: Path) -> list[str]:
    """The arguments of ``fit`` for one run (the demo config with the variant's settings)."""
    from lit_lowrank import get_method

    variant = VARIANTS[name]
    args = ["--config", str(CONFIG), f"--lowrank.lr={lr}", f"--trainer.max_steps={steps}",
            f"--trainer.val_check_interval={max(steps // 6, 1)}", f"--trainer.default_root_dir={out}",
            f"--trainer.logger.init_args.save_dir={out}", f"--trainer.logger.init_args.name={run_name(name, lr)}",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    if variant.method is None:
        return [*args, "--lowrank.enabled=false"]
    args.append(f"--lowrank.method={variant.method}")
    settings = get_method(variant.method).options
    for key in ("rank", "scale", "update_gap"):  # the method's own value, not the demo's
        if key in settings:
            args.append(f"--lowrank.{key}=null")
    if variant.full_rank:
        args.append("--lowrank.rank=100000")  # clamped to min(m, n) per weight, with a warning
    return args


def run_one(name: str, lr: float, steps: int, out: Path) -> None:
    """Train one configuration in this process (``--run-one``)."""
    import torch

    from lit_lowrank.cli import LowRankCLI
    from lit_lowrank.targets import select_targets

    cli = LowRankCLI(args=cli_args(name, lr, steps, out), run=False)
    if VARIANTS[name].split:
        module = cli.model

        def split_adamw() -> torch.optim.Optimizer:
            targets, rest = select_targets(module.network)
            return torch.optim.AdamW([{"params": list(targets.values()), "lr": ALPHA * lr},
                                      {"params": list(rest.values()), "lr": lr}], lr=lr)

        module.make_optimizer = split_adamw
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def run_name(name: str, lr: float) -> str:
    return f"{name}_lr{lr:g}"


# ---------------------------------------------------------------------------- the sweep
def launch(name: str, lr: float, steps: int, out: Path) -> dict[str, Any]:
    """One run in a subprocess with one thread; its row for results.csv (NaN loss if it failed)."""
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # a clone not pip-installed
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": pythonpath}
    command = [sys.executable, __file__, "--run-one", json.dumps([name, lr, steps, str(out)])]
    start = time.perf_counter()
    log = out / f"{run_name(name, lr)}.log"
    with log.open("w") as stream:
        code = subprocess.run(command, env=env, stdout=stream, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    wall = time.perf_counter() - start
    row = {"variant": name, "lr": lr, "steps": steps, "wall_s": round(wall, 1)}
    metrics = read_metrics(out / run_name(name, lr))
    if code != 0 or metrics is None:
        print(f"  {run_name(name, lr)} failed (exit {code}); see {log}", flush=True)
        return {**row, "val_loss": math.nan, "val_ppl": math.nan, "state_bytes": math.nan}
    val_loss = metrics["val/loss"][-1][1]
    print(f"  {run_name(name, lr)}: val loss {val_loss:.4f} in {wall:.0f} s", flush=True)
    return {**row, "val_loss": val_loss, "val_ppl": math.exp(val_loss),
            "state_bytes": metrics["optim/state_bytes"][-1][1]}


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]] | None:
    """``{column: [(step, value), ...]}`` from the newest ``version_*/metrics.csv`` of a run."""
    versions = sorted(run_dir.glob("version_*/metrics.csv"), key=lambda path: path.stat().st_mtime)
    if not versions:
        return None
    columns: dict[str, list[tuple[int, float]]] = {}
    with versions[-1].open() as stream:
        for row in csv.DictReader(stream):
            for key in ("val/loss", "optim/state_bytes"):
                if row.get(key):
                    columns.setdefault(key, []).append((int(row["step"]), float(row[key])))
    return columns if "val/loss" in columns and "optim/state_bytes" in columns else None


def sweep(plan: list[tuple[str, float]], steps: int, out: Path, jobs: int) -> list[dict[str, Any]]:
    """Run what is not done yet, ``jobs`` at a time; all rows for ``plan``. A run is done when
    ``results.csv`` has its row and its run folder is here (a fresh clone has the committed rows
    without the folders: those runs are made again, their new rows appended)."""
    results_path = out / "results.csv"
    rows = read_rows(results_path)
    done = {(row["variant"], float(row["lr"]), int(row["steps"])): row for row in rows
            if read_metrics(out / run_name(row["variant"], float(row["lr"]))) is not None}
    todo = [(name, lr) for name, lr in plan if (name, lr, steps) not in done]
    orphans = sum((r["variant"], float(r["lr"]), int(r["steps"])) not in done for r in rows)
    print(f"{len(plan)} runs, {len(plan) - len(todo)} already in {results_path}"
          + (f" ({orphans} of its rows have no run folder here: those in the plan run again)"
             if orphans else ""), flush=True)
    prepare_data()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for row in pool.map(lambda item: launch(*item, steps, out), todo):
            append_row(results_path, row)
            done[(row["variant"], float(row["lr"]), steps)] = row
    return [done[(name, lr, steps)] for name, lr in plan]


def prepare_data() -> None:
    """Tokenize the demo corpus once, before parallel runs would race to."""
    from lit_lowrank.data import PretrainData

    PretrainData(seq_len=128, batch_size=16, vocab_size=4096).prepare_data()


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open() as stream:
        return list(csv.DictReader(stream))


def append_row(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


# ---------------------------------------------------------------------------- reporting
def best_runs(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The run with the lowest final validation loss of each variant (failed runs never win)."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        loss = float(row["val_loss"])
        if math.isfinite(loss) and (row["variant"] not in best or loss < float(best[row["variant"]]["val_loss"])):
            best[row["variant"]] = row
    return best


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Best lr per variant: final validation perplexity and its ratio to the best AdamW and to
    AdamW with the split learning rate, optimizer-state MB and wall time."""
    best = best_runs(rows)
    swept = {name: sorted({float(r["lr"]) for r in rows if r["variant"] == name}) for name in best}
    reference = {key: float(best[key]["val_ppl"]) if key in best else math.nan for key in ("adamw", "adamw-split")}
    state = float(best["adamw"]["state_bytes"]) if "adamw" in best else math.nan
    lines = ["| method | lr (of swept) | val ppl | × AdamW | × AdamW-split | state MB | × AdamW | wall s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in best.items():
        ppl, size = float(row["val_ppl"]), float(row["state_bytes"])
        lrs = ", ".join(f"{lr:g}" for lr in swept[name])
        lines.append(f"| {name} | {float(row['lr']):g} (of {lrs}) | {ppl:.1f} | {ppl / reference['adamw']:.3f} | "
                     f"{ppl / reference['adamw-split']:.3f} | {size / 1e6:.2f} | {size / state:.3f} | "
                     f"{float(row['wall_s']):.0f} |")
    return "\n".join(lines) + "\n"


def write_curves(best: dict[str, dict[str, Any]], out: Path) -> dict[str, list[tuple[int, float]]]:
    curves = {name: read_metrics(out / run_name(name, float(row["lr"])))["val/loss"] for name, row in best.items()}
    with (out / "curves.csv").open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["variant", "lr", "step", "val_loss"])
        for name, points in curves.items():
            writer.writerows([name, best[name]["lr"], step, loss] for step, loss in points)
    return curves


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """Validation loss by step, one line per variant (the AdamW controls dashed), legend outside."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 5))
    axes = figure.subplots()
    colors = colormaps["tab20"].colors
    for index, (name, points) in enumerate(curves.items()):
        steps, losses = zip(*points)
        style = "--" if name.startswith("adamw") else "-"
        axes.plot(steps, losses, style, color=colors[index % len(colors)], label=name, linewidth=1.4)
    axes.set_xlabel("step")
    axes.set_ylabel("validation loss")
    axes.set_title("demo LLaMA on Shakespeare: best lr per method")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=80)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=list(VARIANTS), help="default: all (or the quick subset)")
    parser.add_argument("--quick", action="store_true", help="a representative subset at one lr each")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (the demo's 300)")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each (2: a 2-core machine)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "convergence")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_one:
        name, lr, steps, out = json.loads(args.run_one)
        return run_one(name, lr, steps, Path(out))

    lrs = QUICK if args.quick else {name: variant.lrs for name, variant in VARIANTS.items()}
    names = args.methods or list(lrs)
    plan = [(name, lr) for name in names for lr in lrs.get(name, VARIANTS[name].lrs)]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = sweep(plan, args.steps, args.out, args.jobs)
    table = markdown_table(rows)
    (args.out / "table.md").write_text(table)
    best = best_runs(rows)
    if best:
        plot_curves(write_curves(best, args.out), args.out / "val_loss.png")
    print(table)


if __name__ == "__main__":
    main()
