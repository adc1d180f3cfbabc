"""A LLaMA small enough for CPU tests: hidden 32, 2 layers (14 projectable weights)."""

from __future__ import annotations

import pytest

from lit_lowrank.models import Llama

SMALL = dict(hidden_size=32, intermediate_size=64, num_heads=2, num_layers=2)


@pytest.fixture
def small_llama():
    def make(vocab_size: int = 64) -> Llama:
        return Llama("tiny", vocab_size=vocab_size, **SMALL)

    return make
