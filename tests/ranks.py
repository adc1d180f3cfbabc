"""Run a test's worker on several gloo processes (CPU), as ``torch.distributed`` jobs do."""

from __future__ import annotations

import os
import socket
from typing import Any, Callable

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

requires_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                   reason="needs torch.distributed with gloo")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(worker: Callable[..., None], *args: Any, world_size: int = 2) -> None:
    """``worker(rank, world_size, *args)`` in ``world_size`` processes joined in one gloo group
    (``worker`` must be a module-level function: the processes are spawned)."""
    mp.spawn(_entry, args=(worker, world_size, free_port(), args), nprocs=world_size, join=True)


def _entry(rank: int, worker: Callable[..., None], world_size: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        worker(rank, world_size, *args)
        dist.barrier()  # no rank closes its connections while another still receives its last collective
    finally:
        dist.destroy_process_group()
