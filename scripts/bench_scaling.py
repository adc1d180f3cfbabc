"""How the optimizer's cost grows: step time and state bytes against model size (LLaMA
20M/60M/130M/350M at the GaLore papers' ranks) and against rank (at 60M), for torch AdamW
(default and fused), galore-torch, and GaLore/APOLLO here, in one run.

    python scripts/bench_scaling.py --quick               # 20M and 60M, ranks 32–128: about two minutes
    python scripts/bench_scaling.py                        # the README's figures
    python scripts/bench_scaling.py --device cuda

Every optimizer steps the same model with the same fixed gradients; the step time is the median
of ``--steps`` steady-state steps (no subspace refresh). The low-rank part of a GaLore step is
two r-wide matmuls per m×n target weight — ``R = PᵀG`` and the lift ``P N``, ``4·r·m·n`` FLOPs —
and of an APOLLO step one (``R = PᵀG``; its update scales G per channel). The achieved GFLOP/s is
those FLOPs over the whole step's time (a lower bound: the step also runs Adam on R and AdamW on
the dense weights), next to the machine's float32 matmul peak (a 2048×2048 product, best of 5)
measured right after that row, so a shared machine's changing speed affects both alike. Writes
``scaling.csv`` and ``scaling.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from lit_lowrank import build_optimizer, select_targets
from lit_lowrank.memory import measured_state_bytes
from lit_lowrank.models.llama import GALORE_RANKS, llama_config

from bench_optim import Clock, galore_torch  # scripts/ is on the path when a script runs

Factory = Callable[[nn.Module, int], torch.optim.Optimizer]
ROOT = Path(__file__).resolve().parents[1]


OPTIMIZERS: dict[str, Factory] = {
    "adamw": lambda model, rank: torch.optim.AdamW(model.parameters(), lr=1e-3),
    "adamw-fused": lambda model, rank: torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True),
    "galore-torch": lambda model, rank: galore_torch(model, rank, gap=1000),
    "galore": lambda model, rank: build_optimizer(model, method="galore", rank=rank, update_gap=1000),
    "apollo": lambda model, rank: build_optimizer(model, method="apollo", rank=rank, update_gap=1000),
}
LOW_RANK_MATMULS = {"galore": 2, "apollo": 1}
"""r-wide matmuls per target weight and step: GaLore projects and lifts (``PᵀG``, ``P N``), APOLLO
only projects (its update is G scaled per channel)."""


def model_with_gradients(size: str, device: str) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(size)).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model


def median_step(optimizer: torch.optim.Optimizer, steps: int, clock: Clock) -> float:
    """Seconds of a steady-state ``step()``: median over ``steps`` after two warm-up steps (the
    first computes the subspaces)."""
    for _ in range(2):
        optimizer.step()
    return statistics.median(clock.time(optimizer.step) for _ in range(steps))


def lowrank_flops(model: nn.Module, rank: int, matmuls: int) -> int:
    """``Σ matmuls · 2·r·m·n`` over the target weights (rank clamped to min(m, n))."""
    targets, _ = select_targets(model)
    return sum(matmuls * 2 * min(rank, *p.shape) * p.shape[0] * p.shape[1] for p in targets.values())


def matmul_peak(clock: Clock, n: int = 2048, repeats: int = 5) -> float:
    """float32 GFLOP/s of an n×n @ n×n product (best of ``repeats``)."""
    device = "cuda" if clock.cuda else "cpu"
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    return 2 * n**3 / min(clock.time(lambda: a @ b) for _ in range(repeats)) / 1e9


def measure(size: str, rank: int, names: Sequence[str], steps: int, device: str) -> list[dict]:
    model = model_with_gradients(size, device)
    params = sum(p.numel() for p in model.parameters())
    clock = Clock(torch.device(device))
    rows = []
    for name in names:
        try:
            optimizer = OPTIMIZERS[name](model, rank)
        except (ImportError, RuntimeError) as error:  # galore-torch absent, fused AdamW on this device
            print(f"  {name} at {size}: skipped ({type(error).__name__}: {str(error).splitlines()[0]})")
            continue
        seconds = median_step(optimizer, steps, clock)
        flops = lowrank_flops(model, rank, LOW_RANK_MATMULS[name]) if name in LOW_RANK_MATMULS else 0
        rows.append({"size": size, "params": params, "rank": rank, "optimizer": name, "step_ms": seconds * 1e3,
                     "state_mib": measured_state_bytes(optimizer) / 2**20,
                     "lowrank_gflops": flops / seconds / 1e9 if flops else 0.0,
                     "matmul_peak_gflops": matmul_peak(clock) if flops else 0.0})
        del optimizer
    return rows


def print_table(rows: list[dict]) -> None:
    print("| size | params | rank | optimizer | step ms | × adamw | state MiB | × adamw | low-rank GFLOP/s (% of peak) |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for row in rows:
        base = next(r for r in rows if (r["size"], r["rank"], r["optimizer"]) == (row["size"], row["rank"], "adamw"))
        gflops = (f"{row['lowrank_gflops']:.1f} ({100 * row['lowrank_gflops'] / row['matmul_peak_gflops']:.0f} %"
                  f" of {row['matmul_peak_gflops']:.0f})"
                  if row["lowrank_gflops"] else "—")
        print(f"| {row['size']} | {row['params'] / 1e6:.1f} M | {row['rank']} | {row['optimizer']} | "
              f"{row['step_ms']:.1f} | {row['step_ms'] / base['step_ms']:.2f} | {row['state_mib']:.1f} | "
              f"{row['state_mib'] / base['state_mib']:.3f} | {gflops} |")


def plot(size_rows: list[dict], rank_rows: list[dict], path: Path) -> None:
    """Step time (top) and state (bottom) against model size (left) and rank (right), log–log."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 7.5))
    axes = figure.subplots(2, 2)
    rank_size = rank_rows[0]["size"] if rank_rows else ""
    for column, (rows, x, xlabel, title) in enumerate([
            (size_rows, "params", "parameters (M)", "against model size (papers' ranks)"),
            (rank_rows, "rank", "rank", f"against rank ({rank_size})")]):
        for row_index, (y, ylabel) in enumerate([("step_ms", "optimizer step (ms)"), ("state_mib", "state (MiB)")]):
            ax = axes[row_index, column]
            for index, name in enumerate(OPTIMIZERS):  # one colour and marker per optimizer in every panel
                points = [(r[x] / 1e6 if x == "params" else r[x], r[y]) for r in rows if r["optimizer"] == name]
                if points:
                    ax.plot(*zip(*points), marker="osD^v"[index], color=f"C{index}", label=name, alpha=0.85)
            ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=f"{ylabel.split(' (')[0]} {title}")
            ticks = sorted({r[x] / 1e6 if x == "params" else r[x] for r in rows})
            ax.set_xticks(ticks, [f"{tick:.0f}" for tick in ticks], minor=False)
            ax.set_xticks([], minor=True)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=80)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["20m", "60m", "130m", "350m"], choices=list(GALORE_RANKS))
    parser.add_argument("--ranks", nargs="+", type=int, default=[32, 64, 128, 256, 512])
    parser.add_argument("--rank-size", default="60m", help="the model size of the rank sweep")
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="20M and 60M, ranks 32 and 128, 3 steps")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "scaling")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.quick:
        args.sizes, args.ranks, args.steps = ["20m", "60m"], [32, 128], 3

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{device_name}, torch {torch.__version__}; median of {args.steps} steady-state steps")
    size_rows = [row for size in args.sizes for row in measure(size, GALORE_RANKS[size], args.optimizers, args.steps,
                                                                args.device)]
    rank_rows = [row for rank in args.ranks for row in measure(args.rank_size, rank, ["adamw", *LOW_RANK_MATMULS],
                                                                args.steps, args.device)]
    print_table(size_rows)
    print_table(rank_rows)
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "scaling.csv").open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=[*size_rows[0], "sweep"])
        writer.writeheader()
        for sweep, rows in (("size", size_rows), ("rank", rank_rows)):
            writer.writerows({**row, "sweep": sweep} for row in rows)
    plot(size_rows, rank_rows, args.out / "scaling.png")
    print(f"wrote {args.out / 'scaling.csv'} and {args.out / 'scaling.png'}")


if __name__ == "__main__":
    main()
