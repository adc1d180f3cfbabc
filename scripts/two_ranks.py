"""What the distributed benchmarks (``bench_comm.py``, ``bench_fsdp.py``) share: a measurement on
two gloo processes on this machine, one thread each, each training on its own random sequences,
and their command line."""

import argparse
import os
import tempfile
from socket import socket
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RunAll = Callable[[str, list[torch.Tensor], int], dict[str, Any]]
"""``run_all(size, tokens, warmup)``: every mode's results on this rank."""


def _worker(rank: int, world_size: int, port: int, run_all: RunAll, size: str, steps: int, warmup: int, seq: int,
            out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    generator = torch.Generator().manual_seed(rank)
    tokens = [torch.randint(0, 1024, (1, seq), generator=generator) for _ in range(warmup + steps)]
    results = run_all(size, tokens, warmup)
    if rank == 0:
        torch.save(results, out)
    dist.barrier()  # no rank closes its connections while another still receives its last collective
    dist.destroy_process_group()


def measure_on_two_ranks(run_all: RunAll, size: str, steps: int, warmup: int, seq: int) -> dict[str, Any]:
    """Rank 0's results of ``run_all`` (a module-level function: the processes are spawned)."""
    with socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "results.pt")
        mp.spawn(_worker, args=(2, port, run_all, size, steps, warmup, seq, out), nprocs=2, join=True)
        return torch.load(out)


def parser(doc: str) -> argparse.ArgumentParser:
    """The shared options: the measured size, steps, warm-up, sequence length, on-paper sizes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="60m", help="LLaMA size measured on 2 gloo processes")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (one sequence per rank)")
    parser.add_argument("--paper", nargs="+", default=["60m", "1b", "7b"], help="sizes computed on paper")
    parser.add_argument("--no-measure", action="store_true", help="only the on-paper table")
    return parser
