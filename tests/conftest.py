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
