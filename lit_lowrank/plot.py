"""``python -m lit_lowrank plot RUN_DIR [RUN_DIR ...]``: a run's logged curves in one PNG.

Reads the ``metrics.csv`` that Lightning's ``CSVLogger`` writes (the shipped configs log to one)
and draws one panel per quantity found — training and validation loss, validation perplexity,
learning rate, optimizer-state bytes, subspace refreshes, skipped steps — against the step,
with several runs overlaid, each labelled by the method and learning rate of the ``config.yaml``
saved beside its ``metrics.csv`` (its folder where there is none, or where two runs would share
a label). A ``RUN_DIR`` is a directory holding ``metrics.csv`` or one holding
``version_*/metrics.csv`` (each version is a run); a run that cannot be read is skipped with a
warning.
"""

from __future__ import annotations

import argparse
import csv
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

from lit_lowrank.extras import require

PANELS = {
    "train/loss": "training loss",
    "val/loss": "validation loss",
    "val/ppl": "validation perplexity",
    "train/lr": "learning rate",
    "optim/state_bytes": "optimizer state (bytes)",
    "optim/refreshes": "subspace refreshes",
    "optim/skipped_steps": "skipped steps",
}
"""Logged column → the panel's y label, in drawing order."""

Curves = dict[str, list[tuple[int, float]]]


def find_runs(run_dirs: Sequence[Path]) -> dict[str, Path]:
    """``{run name: metrics.csv}``: a directory's own ``metrics.csv``, else one per version.

    Raises:
        FileNotFoundError: for a directory with neither (naming it).
    """
    runs: dict[str, Path] = {}
    for run_dir in map(Path, run_dirs):
        if (run_dir / "metrics.csv").is_file():
            runs[str(run_dir)] = run_dir / "metrics.csv"
            continue
        versions = sorted(run_dir.glob("version_*/metrics.csv"))
        if not versions:
            raise FileNotFoundError(f"no metrics.csv in {run_dir} or its version_* directories; pass a run "
                                    "directory written by Lightning's CSVLogger (e.g. runs/demo)")
        runs.update({f"{run_dir}/{path.parent.name}": path for path in versions})
    return runs


def read_curves(path: Path) -> Curves:
    """The known columns of a ``metrics.csv`` as ``(step, value)`` points; CSVLogger leaves a
    column empty on the rows of other logging calls, and those are skipped, as are NaN and
    infinite values (a diverged run); a column with no finite value gets no curve.

    Raises:
        ValueError: if there is no ``step`` column, or no finite value in any known column
            (listing the columns there are).
    """
    with path.open() as stream:
        reader = csv.DictReader(stream)
        rows = list(reader)
        columns = reader.fieldnames or []
    if "step" not in columns:
        raise ValueError(f"{path} has no step column; it has {columns}")
    curves: Curves = {}
    for column in PANELS:
        points = [(int(row["step"]), float(row[column])) for row in rows if row.get(column) not in (None, "")]
        if points := [(step, value) for step, value in points if math.isfinite(value)]:
            curves[column] = points
    if not curves:
        raise ValueError(f"{path} has no finite value in any of the columns {list(PANELS)}; it has {columns}")
    return curves


def readable_runs(runs: dict[str, Path]) -> dict[str, Curves]:
    """``{label: curves}`` of every run that can be read (:func:`run_label`); the others are
    skipped with a warning naming them and why.

    Raises:
        ValueError: if no run can be read (with each run's reason).
    """
    curves, errors = {}, {}
    for name, path in runs.items():
        try:
            curves[name] = read_curves(path)
        except (OSError, ValueError, csv.Error) as error:
            errors[name] = error
    if not curves:
        raise ValueError("; ".join(map(str, errors.values())))
    for name, error in errors.items():
        warnings.warn(f"skipping run {name}: {error}", UserWarning, stacklevel=3)
    labels = {name: run_label(runs[name].parent) for name in curves}
    shared = {label for label in labels.values() if list(labels.values()).count(label) > 1}
    return {(name if not labels[name] else f"{labels[name]} ({name})" if labels[name] in shared else labels[name]):
            points for name, points in curves.items()}


def run_label(run_dir: Path) -> str:
    """``"galore, lr 0.01"``: the method (or projector and rule; ``adamw`` when disabled) and
    peak lr of the ``lowrank`` section of ``run_dir/config.yaml``; ``""`` without one."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        return ""
    try:
        import yaml  # jsonargparse's dependency: there wherever the CLI wrote the config
    except ImportError:
        return ""
    try:
        lowrank = (yaml.safe_load(config_path.read_text()) or {}).get("lowrank") or {}
    except (yaml.YAMLError, AttributeError):  # not YAML; not a mapping
        return ""
    if lowrank.get("enabled") is False:
        method = "adamw"
    else:
        method = lowrank.get("method") or "/".join(str(lowrank[key]) for key in ("projector", "rule")
                                                     if lowrank.get(key)) or "galore"
    return f"{method}, lr {lowrank['lr']}" if "lr" in lowrank else method


def plot_runs(run_dirs: Sequence[Path], out: Path) -> Any:
    """Draw every run of ``run_dirs`` into ``out`` (PNG); returns the matplotlib figure.

    The figure is a bare ``matplotlib.figure.Figure`` saved by the Agg canvas: no pyplot, so no
    display, no change of the caller's backend and no figure left open in pyplot's registry.
    """
    require("plot", "matplotlib")
    from matplotlib.figure import Figure

    runs = readable_runs(find_runs(run_dirs))
    columns = [column for column in PANELS if any(column in curves for curves in runs.values())]
    cols = 2 if len(columns) > 1 else 1
    rows = math.ceil(len(columns) / cols)
    figure = Figure(figsize=(6 * cols, 3.2 * rows))
    axes = figure.subplots(rows, cols, squeeze=False)
    for ax, column in zip(axes.flat, columns):
        for name, curves in runs.items():
            if column in curves:
                steps, values = zip(*curves[column])
                ax.plot(steps, values, label=name, marker="o" if len(steps) < 20 else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(PANELS[column])
        if column in ("train/loss", "val/ppl", "train/lr"):
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(columns):]:
        ax.set_visible(False)
    figure.tight_layout()
    figure.savefig(out, dpi=90)
    return figure


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m lit_lowrank plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, default=Path("curves.png"), help="the PNG to write (curves.png)")
    args = parser.parse_args(argv)
    try:
        plot_runs(args.run_dirs, args.out)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(f"wrote {args.out}")
