"""Convergence per method: the demo LLaMA pretrained with AdamW and every method of the README's
table, same seed, data order and token budget, through the library's own CLI path.

    python scripts/bench_convergence.py --quick               # a representative subset: 9 min on 2 cores
    python scripts/bench_convergence.py                       # every method: the README's table
    python scripts/bench_convergence.py --methods adamw galore --steps 100
    python scripts/bench_convergence.py --methods galore --lrs 0.02 --seed 1   # run-to-run noise

Each configuration is ``python -m lit_lowrank fit --config configs/demo.yaml`` (hidden 128, 4
layers, 16 × 128 tokens per step on the embedded Shakespeare corpus) with ``--lowrank.method``
and ``--lowrank.lr`` set, run in its own process with one thread; the method's own settings
(APOLLO's α = 1, APOLLO-Mini's rank 1) replace the demo's rank 32 / α 0.25 / T 50 where it sets
them. AdamW, the controls and the methods with their own update (GaLore, Fira, APOLLO,
APOLLO-Mini, SNSM, subset-norm Adam, Adafactor, Lion) and the projections that are not an SVD of
G (random, online PCA) get a small learning-rate sweep around the papers' lr; GaLore's other
projector, storage and schedule variants (``galore-warm``: the warm-started SVD; ``galore-stagger``:
GaLore with ``schedule_args: {stagger: true}``) run at GaLore's best lr. The best run by final
validation loss is reported; a best lr at the edge of its sweep got the next value added.

``--seed`` sets the runs' ``seed_everything`` (default 0, the demo's: the rows without a seed
were run with it): the model's initialisation; the data order keeps its own seed (the data
module's ``seed``). A variant run with several seeds gets a table row and a curve per seed, and
``table.md`` a second table: each seed's final validation loss, their mean and spread (the
run-to-run noise) and the mean's difference from GaLore's mean.

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
    settings: tuple[str, ...] = ()  # further ``fit`` arguments, e.g. a schedule option


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
    "galore-warm": Variant(GALORE_BEST, method="galore-warm"),
    "galore-stagger": Variant(GALORE_BEST, method="galore", settings=("--lowrank.schedule_args={stagger: true}",)),
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
FIELDS = ["variant", "lr", "steps", "val_loss", "val_ppl", "state_bytes", "wall_s", "seed"]
DEFAULT_SEED = 0  # configs/demo.yaml's seed_everything: the rows without a seed were run with it


# ---------------------------------------------------------------------------- one run
def cli_args(name: str, lr: float, steps: int, out: Path, seed: int = DEFAULT_SEED) -> list[str]:
    """The arguments of ``fit`` for one run (the demo config with the variant's settings and seed)."""
    from lit_lowrank import get_method

    variant = VARIANTS[name]
    args = ["--config", str(CONFIG), f"--seed_everything={seed}", f"--lowrank.lr={lr}", f"--trainer.max_steps={steps}",
            f"--trainer.val_check_interval={max(steps // 6, 1)}", f"--trainer.default_root_dir={out}",
            f"--trainer.logger.init_args.save_dir={out}", f"--trainer.logger.init_args.name={run_name(name, lr, seed)}",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    if variant.method is None:
        return [*args, "--lowrank.enabled=false"]
    args += [f"--lowrank.method={variant.method}", *variant.settings]
    settings = get_method(variant.method).options
    for key in ("rank", "scale", "update_gap"):  # the method's own value, not the demo's
        if key in settings:
            args.append(f"--lowrank.{key}=null")
    if variant.full_rank:
        args.append("--lowrank.rank=100000")  # clamped to min(m, n) per weight, with a warning
    return args


def run_one(name: str, lr: float, steps: int, out: Path, seed: int = DEFAULT_SEED) -> None:
    """Train one configuration in this process (``--run-one``)."""
    import torch

    from lit_lowrank.cli import LowRankCLI
    from lit_lowrank.targets import select_targets

    cli = LowRankCLI(args=cli_args(name, lr, steps, out, seed), run=False)
    if VARIANTS[name].split:
        module = cli.model

        def split_adamw() -> torch.optim.Optimizer:
            targets, rest = select_targets(module.network)
            return torch.optim.AdamW([{"params": list(targets.values()), "lr": ALPHA * lr},
                                      {"params": list(rest.values()), "lr": lr}], lr=lr)

        module.make_optimizer = split_adamw
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def run_name(name: str, lr: float, seed: int = DEFAULT_SEED) -> str:
    """The run's folder and log name (the default seed's runs keep their seedless names)."""
    return f"{name}_lr{lr:g}" + (f"_seed{seed}" if seed != DEFAULT_SEED else "")


def row_seed(row: dict[str, Any]) -> int:
    """A results.csv row's seed (rows from before the column: the default seed)."""
    return int(row.get("seed") or DEFAULT_SEED)


def row_key(row: dict[str, Any]) -> tuple[str, float, int, int]:
    """What identifies a run: variant, lr, steps and seed."""
    return row["variant"], float(row["lr"]), int(row["steps"]), row_seed(row)


# ---------------------------------------------------------------------------- the sweep
def launch(name: str, lr: float, seed: int, steps: int, out: Path) -> dict[str, Any]:
    """One run in a subprocess with one thread; its row for results.csv (NaN loss if it failed)."""
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # a clone not pip-installed
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": pythonpath}
    command = [sys.executable, __file__, "--run-one", json.dumps([name, lr, steps, str(out), seed])]
    start = time.perf_counter()
    run = run_name(name, lr, seed)
    log = out / f"{run}.log"
    with log.open("w") as stream:
        code = subprocess.run(command, env=env, stdout=stream, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    wall = time.perf_counter() - start
    row = {"variant": name, "lr": lr, "steps": steps, "wall_s": round(wall, 1), "seed": seed}
    metrics = read_metrics(out / run)
    if code != 0 or metrics is None:
        print(f"  {run} failed (exit {code}); see {log}", flush=True)
        return {**row, "val_loss": math.nan, "val_ppl": math.nan, "state_bytes": math.nan}
    val_loss = metrics["val/loss"][-1][1]
    print(f"  {run}: val loss {val_loss:.4f} in {wall:.0f} s", flush=True)
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


def sweep(plan: list[tuple[str, float, int]], steps: int, out: Path, jobs: int) -> None:
    """Run what is not done yet of ``plan`` (variant, lr, seed), ``jobs`` at a time, appending
    their rows to ``results.csv``. A run is done when ``results.csv`` has its row and its run
    folder is here (a fresh clone has the committed rows without the folders: those runs are made
    again, their new rows appended)."""
    results_path = out / "results.csv"
    rows = read_rows(results_path)
    done = {row_key(row): row for row in rows
            if read_metrics(out / run_name(row["variant"], float(row["lr"]), row_seed(row))) is not None}
    todo = [(name, lr, seed) for name, lr, seed in plan if (name, lr, steps, seed) not in done]
    orphans = sum(row_key(row) not in done for row in rows)
    print(f"{len(plan)} runs, {len(plan) - len(todo)} already in {results_path}"
          + (f" ({orphans} of its rows have no run folder here: those in the plan run again)"
             if orphans else ""), flush=True)
    prepare_data()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for row in pool.map(lambda item: launch(*item, steps, out), todo):
            append_row(results_path, row)


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
    """Append ``row``; a file with an older header (no seed) is first rewritten with the default seed."""
    if path.exists() and read_header(path) != FIELDS:
        write_rows(path, [{**old, "seed": row_seed(old)} for old in read_rows(path)])
    new = not path.exists()
    with path.open("a", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def read_header(path: Path) -> list[str]:
    with path.open() as stream:
        return next(csv.reader(stream), [])


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------------------- reporting
NOISE_REFERENCE = "galore"  # the variant whose seed-to-seed spread the other rows are compared with


def finite(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs that did not fail (a NaN loss never wins and never counts)."""
    return [row for row in rows if math.isfinite(float(row["val_loss"]))]


def seeds_of(rows: list[dict[str, Any]]) -> dict[str, set[int]]:
    """``{variant: seeds it was run with}``."""
    seeds: dict[str, set[int]] = {}
    for row in finite(rows):
        seeds.setdefault(row["variant"], set()).add(row_seed(row))
    return seeds


def label(row: dict[str, Any], seeds: dict[str, set[int]]) -> str:
    """A row's name in the table and plot: the variant, with its seed where it was run with several."""
    name = row["variant"]
    return name if len(seeds.get(name, ())) < 2 else f"{name} (seed {row_seed(row)})"


def best_runs(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The run with the lowest final validation loss of each variant and seed, by :func:`label`
    (failed runs never win); the variants in the order of their first row, each one's seeds
    ascending."""
    seeds = seeds_of(rows)
    best: dict[str, dict[str, Any]] = {}
    for row in finite(rows):
        name = label(row, seeds)
        if name not in best or float(row["val_loss"]) < float(best[name]["val_loss"]):
            best[name] = row
    first = {variant: index for index, variant in reversed(list(enumerate(row["variant"] for row in rows)))}
    return dict(sorted(best.items(), key=lambda item: (first[item[1]["variant"]], row_seed(item[1]))))


def reference_ppl(rows: list[dict[str, Any]], variant: str) -> float:
    """The best validation perplexity of ``variant`` at the default seed (NaN if it has none)."""
    ppls = [float(row["val_ppl"]) for row in finite(rows) if row["variant"] == variant and row_seed(row) == DEFAULT_SEED]
    return min(ppls, default=math.nan)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Best lr per variant (and seed, where a variant has several): final validation perplexity and
    its ratio to the best AdamW and to AdamW with the split learning rate, optimizer-state MB and
    wall time; then the seed-to-seed spread, where some variant was run with several seeds."""
    best = best_runs(rows)
    swept = {name: sorted({float(r["lr"]) for r in rows if r["variant"] == row["variant"]}) for name, row in best.items()}
    adamw, split = reference_ppl(rows, "adamw"), reference_ppl(rows, "adamw-split")
    adamw_state = min((float(r["state_bytes"]) for r in finite(rows) if r["variant"] == "adamw"), default=math.nan)
    lines = ["| method | lr (of swept) | val ppl | × AdamW | × AdamW-split | state MB | × AdamW | wall s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in best.items():
        ppl, size = float(row["val_ppl"]), float(row["state_bytes"])
        lrs = ", ".join(f"{lr:g}" for lr in swept[name])
        lines.append(f"| {name} | {float(row['lr']):g} (of {lrs}) | {ppl:.1f} | {ppl / adamw:.3f} | "
                     f"{ppl / split:.3f} | {size / 1e6:.2f} | {size / adamw_state:.3f} | "
                     f"{float(row['wall_s']):.0f} |")
    spread = seed_spread_table(rows)
    return "\n".join(lines) + "\n" + (f"\n{spread}" if spread else "")


def seed_groups(rows: list[dict[str, Any]]) -> dict[tuple[str, float], dict[int, float]]:
    """``{(variant, lr): {seed: final validation loss}}`` of the configurations run with several seeds."""
    groups: dict[tuple[str, float], dict[int, float]] = {}
    for row in finite(rows):
        groups.setdefault((row["variant"], float(row["lr"])), {})[row_seed(row)] = float(row["val_loss"])
    return {key: losses for key, losses in groups.items() if len(losses) > 1}


def seed_spread_table(rows: list[dict[str, Any]]) -> str:
    """Per configuration run with several seeds: the final validation loss of each seed, their mean,
    their spread (max − min: the run-to-run noise) and the mean's difference from the mean of
    :data:`NOISE_REFERENCE` (GaLore) at its own multi-seed lr. Empty if no configuration has two seeds."""
    groups = seed_groups(rows)
    if not groups:
        return ""
    means = {key: sum(losses.values()) / len(losses) for key, losses in groups.items()}
    reference = [mean for (variant, _), mean in means.items() if variant == NOISE_REFERENCE]
    lines = [f"| method | lr | val loss by seed | mean | max − min | mean − {NOISE_REFERENCE}'s mean |",
             "|---|---:|---|---:|---:|---:|"]
    for (variant, lr), losses in groups.items():
        by_seed = ", ".join(f"{seed}: {loss:.4f}" for seed, loss in sorted(losses.items()))
        difference = f"{means[variant, lr] - reference[0]:+.4f}" if len(reference) == 1 else "—"
        lines.append(f"| {variant} | {lr:g} | {by_seed} | {means[variant, lr]:.4f} | "
                     f"{max(losses.values()) - min(losses.values()):.4f} | {difference} |")
    return "\n".join(lines) + "\n"


Curve = list[tuple[int, float]]


def read_curves(path: Path) -> dict[tuple[str, float, int], Curve]:
    """``{(variant, lr, seed): [(step, val loss), ...]}`` of a curves.csv (rows without a seed: the default)."""
    curves: dict[tuple[str, float, int], Curve] = {}
    for row in read_rows(path):
        curves.setdefault((row["variant"], float(row["lr"]), row_seed(row)), []).append(
            (int(row["step"]), float(row["val_loss"])))
    return curves


def write_curves(best: dict[str, dict[str, Any]], out: Path) -> dict[str, Curve]:
    """curves.csv of the best runs, by label: from each run's folder, or, for a run whose folder is
    not here (a clone), from the curves.csv already there; a run with neither is left out."""
    previous = read_curves(out / "curves.csv")
    curves: dict[str, Curve] = {}
    for name, row in best.items():
        seed = row_seed(row)
        metrics = read_metrics(out / run_name(row["variant"], float(row["lr"]), seed))
        points = metrics["val/loss"] if metrics else previous.get((row["variant"], float(row["lr"]), seed))
        if points:
            curves[name] = points
    with (out / "curves.csv").open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["variant", "lr", "step", "val_loss", "seed"])
        for name, points in curves.items():
            row = best[name]
            writer.writerows([row["variant"], row["lr"], step, loss, row_seed(row)] for step, loss in points)
    return curves


def plot_curves(curves: dict[str, Curve], path: Path) -> None:
    """Validation loss by step, one line per variant (the AdamW controls dashed; a variant's other
    seeds dotted, in its colour), legend outside."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 5))
    axes = figure.subplots()
    colors = colormaps["tab20"].colors
    variants = list(dict.fromkeys(name.split(" (seed ")[0] for name in curves))
    for name, points in curves.items():
        variant = name.split(" (seed ")[0]
        steps, losses = zip(*points)
        other_seed = name != variant and not name.endswith(f"(seed {DEFAULT_SEED})")
        style = "--" if variant.startswith("adamw") else ":" if other_seed else "-"
        axes.plot(steps, losses, style, color=colors[variants.index(variant) % len(colors)], label=name, linewidth=1.4)
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
    parser.add_argument("--lrs", type=float, nargs="+", help="these learning rates instead of each variant's sweep")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="seed_everything of the runs: the initialisation (the demo's 0; the data order has its own seed); "
                             "another seed measures the run-to-run noise")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each (2: a 2-core machine)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "convergence")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_one:
        name, lr, steps, out, seed = json.loads(args.run_one)
        return run_one(name, lr, steps, Path(out), seed)

    lrs = QUICK if args.quick else {name: variant.lrs for name, variant in VARIANTS.items()}
    names = args.methods or list(lrs)
    if args.lrs:
        lrs = {name: tuple(args.lrs) for name in names}
    plan = [(name, lr, args.seed) for name in names for lr in lrs.get(name, VARIANTS[name].lrs)]
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))  # a clone not pip-installed: prepare_data imports lit_lowrank here
    sweep(plan, args.steps, args.out, args.jobs)
    rows = [row for row in read_rows(args.out / "results.csv") if int(row["steps"]) == args.steps]
    table = markdown_table(rows)  # every run of this length in results.csv, not only this plan's
    (args.out / "table.md").write_text(table)
    best = best_runs(rows)
    if best:
        plot_curves(write_curves(best, args.out), args.out / "val_loss.png")
    print(table)


if __name__ == "__main__":
    main()
