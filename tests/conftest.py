"""Shared fixtures: a fresh plugin manager per test that changes plugins."""

from __future__ import annotations

import pytest
import torch

from lit_lowrank import plugins

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


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
