"""Shared fixtures: a fresh plugin manager per test that changes plugins."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch

from lit_lowrank import plugins

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def python_ctrl_c_handler():
    """Each test starts with Python's own Ctrl-C handler: Lightning's teardown of a distributed
    run leaves SIGINT ignored or fatal (``_destroy_dist_connection``) in the test process, where
    a later test that raises SIGINT would then end the whole session silently."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def own_distributed_env():
    """Each test starts with the launcher variables it found: Lightning's DDP launcher writes
    ``MASTER_PORT`` (and the ranks) into the test process, and a later DDP test would reuse a
    port an earlier run may still hold (EADDRINUSE)."""
    before = {name: os.environ.get(name) for name in DISTRIBUTED_ENV}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def no_process_group_left():
    """Each test ends without a default process group: a ``Trainer.fit`` refused during setup
    under a DDP strategy leaves the one it initialized, and the next test to start one would fail
    ("initialize the default process group twice")."""
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture
def fresh_plugins(monkeypatch):
    """Built-ins only (no entry points), rebuilt for this test and restored afterwards."""
    monkeypatch.setenv(plugins.DISABLE_ENTRYPOINTS_ENV, "1")
    plugins.reset()
    yield plugins
    monkeypatch.delenv(plugins.DISABLE_ENTRYPOINTS_ENV)
    plugins.reset()


@pytest.fixture
def assert_same_trajectory():
    """Train two copies of a model side by side on the same random regression batches and
    assert their parameters agree after every step (peer-parity tests)."""

    def check(ours_model, ours, peer_model, peer, *, inputs: int = 20, outputs: int, steps: int = 10) -> None:
        generator = torch.Generator().manual_seed(1)
        for _ in range(steps):
            x, y = torch.randn(16, inputs, generator=generator), torch.randn(16, outputs, generator=generator)
            for model, optimizer in ((ours_model, ours), (peer_model, peer)):
                optimizer.zero_grad()
                torch.nn.functional.mse_loss(model(x), y).backward()
                optimizer.step()
            for mine, theirs in zip(ours_model.parameters(), peer_model.parameters()):
                torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)

    return check


@pytest.fixture
def apollo_torch_draws_ours(monkeypatch):
    """``patch(rank)`` makes apollo-torch (imported by the caller first) draw our random matrices:
    its seed chain starts at (parameter index + 1) and advances by next_seed; with next_seed =
    s + 2³² the seed encodes (index, k), and its stable_randn returns our k-th draw (ours is r×d,
    transposed for its m×r left matrix). Its own generator is device-dependent and chained, ours
    is CPU-seeded from (index, k)."""

    def patch(rank: int) -> None:
        from apollo_torch import random_projector

        def stable_randn(shape, seed, device=None, dtype=torch.float32):
            index, k = (seed & 0xFFFFFFFF) - 1, seed >> 32
            generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence([index, k])))
            left = shape[1] == rank  # its left matrix is m×r, ours is drawn r×m
            draw = generator.standard_normal((rank, shape[0] if left else shape[1]), dtype=np.float32)
            draw = torch.from_numpy(draw)
            return (draw.T if left else draw).to(device=device, dtype=dtype)

        monkeypatch.setattr(random_projector, "stable_randn", stable_randn)
        monkeypatch.setattr(random_projector, "next_seed", lambda seed, adv=None: seed + (1 << 32))

    return patch
