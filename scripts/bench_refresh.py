"""Subspace refresh time on 1 and 2 ranks: every rank computing every SVD, against refresh work
shared across the ranks (``refresh_sharing``: each weight's refresh on one rank, its bases
broadcast).

    python scripts/bench_refresh.py                       # LLaMA-60M, svd
    python scripts/bench_refresh.py --size 20m --projectors svd rsvd --steps 3

Each rank (one gloo process, one thread) holds the same LLaMA and the same fixed gradients —
what DDP's all-reduce leaves on every rank — and steps GaLore (rank 128) with ``update_gap`` 1,
so every step refreshes every target weight, and with a gap longer than the run, so no step
does: the refresh time is the difference of their medians over ``--steps`` steps (after one
first step that builds the state). A step on 2 ranks is timed on each rank between barriers and
the slower rank's time counts; beside the wall time, the CPU time of the slower rank's process
(on a machine shared with other work, what their load does not stretch). Rows: 1 rank; 2 ranks, every rank refreshing every weight
(``refresh_sharing: off``); 2 ranks sharing (``on``). The ``× 1 rank`` columns are the refresh
time over the 1-rank row's. ``refresh MB`` is what a step refreshing every weight exchanged on
each rank (the optimizer's ``comm_bytes``: with sharing, every projector's state broadcast by its
owner — an r·min(m, n) basis per weight; none without).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from socket import socket
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lit_lowrank import build_optimizer
from lit_lowrank.models.llama import llama_config

NEVER = 10**9
"""An update gap longer than any run: only the first step refreshes."""


def timed_steps(optimizer: torch.optim.Optimizer, steps: int, distributed: bool) -> tuple[float, float]:
    """The medians over ``steps`` of one ``optimizer.step()`` (the slowest rank's), after a first
    one: wall time, and this process's CPU time (what the load of other processes on the machine
    does not stretch)."""
    optimizer.step()
    walls, cpus = [], []
    for _ in range(steps):
        if distributed:
            dist.barrier()
        wall, cpu = time.perf_counter(), time.process_time()
        optimizer.step()
        elapsed = torch.tensor([time.perf_counter() - wall, time.process_time() - cpu])
        if distributed:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        walls.append(float(elapsed[0]))
        cpus.append(float(elapsed[1]))
    return statistics.median(walls), statistics.median(cpus)


def llama_with_gradients(size: str) -> torch.nn.Module:
    """LLaMA of ``size`` with fixed random gradients, the same on every rank (seeded)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(size))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model


def measure(size: str, projector: str, sharing: str, steps: int, distributed: bool) -> dict[str, float]:
    """Steady step, refreshing step and refresh time (seconds; wall and CPU) of GaLore with
    ``projector``, and the bytes a refreshing step exchanged (``comm_bytes``; 0 when not counted)."""
    model = llama_with_gradients(size)
    result = {}
    for name, gap in (("refreshing", 1), ("steady", NEVER)):
        optimizer = build_optimizer(model, rank=128, update_gap=gap, scale=0.25, lr=0.01, projector=projector,
                                    refresh_sharing=sharing)
        result[name], result[f"{name} cpu"] = timed_steps(optimizer, steps, distributed)
        if name == "refreshing":
            result["refresh bytes"] = optimizer.comm_bytes or 0
    result["refresh"] = result["refreshing"] - result["steady"]
    result["refresh cpu"] = result["refreshing cpu"] - result["steady cpu"]
    return result


def _worker(rank: int, world_size: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    distributed = world_size > 1
    if distributed:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    modes = ("off", "on") if distributed else ("off",)
    results = {(projector, sharing): measure(args.size, projector, sharing, args.steps, distributed)
               for projector in args.projectors for sharing in modes}
    if rank == 0:
        torch.save(results, out)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


def run(world_size: int, args: argparse.Namespace) -> dict[tuple[str, str], dict[str, float]]:
    """Rank 0's results on ``world_size`` spawned processes."""
    with socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "results.pt")
        mp.spawn(_worker, args=(world_size, port, args, out), nprocs=world_size, join=True)
        return torch.load(out)


def table(single: dict[tuple[str, str], dict[str, float]], double: dict[tuple[str, str], dict[str, float]]) -> str:
    lines = ["| projector | ranks | refresh_sharing | steady step ms | refreshing step ms | refresh ms | × 1 rank "
             "| refresh CPU ms | × 1 rank | refresh MB |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (projector, _), one in single.items():
        rows = [(1, "—", one)] + [(2, sharing, double[projector, sharing]) for sharing in ("off", "on")]
        for ranks, sharing, result in rows:
            lines.append(f"| {projector} | {ranks} | {sharing} | {result['steady'] * 1e3:.0f} | "
                         f"{result['refreshing'] * 1e3:.0f} | {result['refresh'] * 1e3:.0f} | "
                         f"{result['refresh'] / one['refresh']:.2f} | {result['refresh cpu'] * 1e3:.0f} | "
                         f"{result['refresh cpu'] / one['refresh cpu']:.2f} | "
                         f"{result['refresh bytes'] / 1e6:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="60m", help="LLaMA size")
    parser.add_argument("--projectors", nargs="+", default=["svd"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement (median)")
    args = parser.parse_args(argv)
    single, double = run(1, args), run(2, args)
    print(f"LLaMA-{args.size}, GaLore rank 128, fp32, 2 gloo processes (1 thread each) on "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__}; median of {args.steps} steps")
    print(table(single, double))


if __name__ == "__main__":
    main()
