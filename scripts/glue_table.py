"""Collect a directory of GLUE runs into the papers' table: one column per task (main score ×100)
and the average over the papers' eight tasks.

A run directory holds one Lightning ``CSVLogger`` folder per task, as the configs in
configs/glue write them (``runs/glue/<task>/version_N/metrics.csv``); the task is the first
path component that names a GLUE task, and the newest ``version_N`` of each task is used.

    python scripts/glue_table.py runs/glue                   # best validation epoch per task
    python scripts/glue_table.py runs/glue --select last     # the last validation instead
    python scripts/glue_table.py runs/glue --label "GaLore (rank 8)"

Main scores (lit_lowrank.metrics.glue.MAIN_METRIC): CoLA Matthews corr., STS-B Pearson, MRPC F1,
QQP accuracy, MNLI matched accuracy (shown as matched/mismatched), the rest accuracy. WNLI is
shown when present but, as in the papers, left out of the average. Below the table every
validation metric of the selected epochs is listed.
"""

from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

from lit_lowrank.data.glue_tasks import GLUE_SPECS, GLUE_TASKS, PAPER_TASKS
from lit_lowrank.metrics.glue import main_metric_key


def task_of(path: Path) -> str | None:
    """The GLUE task a metrics file belongs to: the first path component naming one."""
    for part in path.parts:
        name = part.lower().replace("-", "")
        if name in GLUE_TASKS:
            return name
    return None


def newest_metrics(run_dir: Path) -> dict[str, Path]:
    """Task → its newest ``metrics.csv`` under ``run_dir`` (highest ``version_N``, else latest mtime)."""
    found: dict[str, list[Path]] = {}
    for path in run_dir.rglob("metrics.csv"):
        task = task_of(path.relative_to(run_dir))
        if task is not None:
            found.setdefault(task, []).append(path)

    def version(path: Path) -> tuple[int, float]:
        match = re.fullmatch(r"version_(\d+)", path.parent.name)
        return (int(match.group(1)) if match else -1, path.stat().st_mtime)

    return {task: max(paths, key=version) for task, paths in found.items()}


def validation_rows(path: Path, task: str) -> list[dict[str, float]]:
    """The rows of ``metrics.csv`` that carry ``task``'s main score, as ``{metric: value}``."""
    key = main_metric_key(task)
    with path.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get(key)]
    return [{k: float(v) for k, v in row.items() if v and (k.startswith("val") or k in ("epoch", "step"))}
            for row in rows]


def select(rows: list[dict[str, float]], task: str, how: str) -> dict[str, float]:
    """The best (highest main score) or the last validation row."""
    if not rows:
        raise ValueError(f"no validation row with {main_metric_key(task)}")
    return max(rows, key=lambda r: r[main_metric_key(task)]) if how == "best" else rows[-1]


def collect(run_dir: Path, how: str = "best") -> dict[str, dict[str, float]]:
    """Task → the selected validation row of its newest run."""
    return {task: select(validation_rows(path, task), task, how) for task, path in newest_metrics(run_dir).items()}


def table(results: dict[str, dict[str, float]], label: str) -> str:
    """A Markdown table in the papers' layout (scores ×100, two decimals)."""
    tasks = [t for t in PAPER_TASKS] + (["wnli"] if "wnli" in results else [])
    cells = []
    for task in tasks:
        if task not in results:
            cells.append("–")
            continue
        cell = f"{100 * results[task][main_metric_key(task)]:.2f}"
        if task == "mnli" and "val_mismatched/accuracy" in results[task]:
            cell += f"/{100 * results[task]['val_mismatched/accuracy']:.2f}"
        cells.append(cell)
    scored = [100 * results[t][main_metric_key(t)] for t in PAPER_TASKS if t in results]
    average = f"{sum(scored) / len(scored):.2f}" if scored else "–"
    if scored and len(scored) < len(PAPER_TASKS):
        average += f" ({len(scored)} of {len(PAPER_TASKS)} tasks)"
    header = "| | " + " | ".join(GLUE_SPECS[t].folder for t in tasks) + " | Avg |"
    rule = "|---" * (len(tasks) + 2) + "|"
    return "\n".join([header, rule, f"| {label} | " + " | ".join(cells) + f" | {average} |"])


def details(results: dict[str, dict[str, float]]) -> str:
    lines = []
    for task in sorted(results, key=lambda t: (t not in PAPER_TASKS, GLUE_TASKS.index(t))):
        row = results[task]
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in sorted(row.items()) if k.startswith("val"))
        lines.append(f"{GLUE_SPECS[task].folder} (epoch {int(row.get('epoch', -1))}, step {int(row.get('step', -1))}): {metrics}")
    return "\n".join(lines)


def elsewhere(run_dir: Path) -> str:
    """``"; GLUE runs are in runs/glue_minilm (sst2, rte): python scripts/glue_table.py
    runs/glue_minilm"``: the folders beside ``run_dir`` that hold task runs (each base config
    logs to its own, e.g. MiniLM's ``runs/glue_minilm``); ``""`` if none."""
    parent = run_dir.parent if run_dir.parent != run_dir else run_dir
    found = {sibling: sorted(newest_metrics(sibling)) for sibling in sorted(parent.glob("*"))
             if sibling.is_dir() and sibling != run_dir}
    hints = [f"{sibling} ({', '.join(tasks)}): python scripts/glue_table.py {sibling}"
             for sibling, tasks in found.items() if tasks]
    return "; GLUE runs are in " + "; ".join(hints) if hints else ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="directory with one CSVLogger folder per task")
    parser.add_argument("--select", choices=("best", "last"), default="best",
                        help="which validation epoch of each run to report (default: best main score)")
    parser.add_argument("--label", default=None, help="the row's name (default: the run directory's name)")
    args = parser.parse_args(argv)
    results = collect(args.run_dir, args.select)
    if not results:
        raise SystemExit(f"error: no metrics.csv under {args.run_dir} in a folder named after a GLUE task "
                         f"({', '.join(GLUE_TASKS)}){elsewhere(args.run_dir)}")
    print(table(results, args.label or args.run_dir.name))
    print()
    print(details(results))


if __name__ == "__main__":
    main()
