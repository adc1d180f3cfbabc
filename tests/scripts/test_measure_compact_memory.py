"""``scripts/measure_compact_memory.py``: CompAct's layers keep less for backward than plain
linear layers on the same LLaMA, at least the down projections' inputs minus the 7 compressed
x·Q per block, and the allocator's peak drops with them."""

from __future__ import annotations

import pytest

from script_loader import loaded_script

pytestmark = pytest.mark.slow  # each test runs the benchmark end to end


@pytest.fixture(scope="module")
def script():
    yield from loaded_script("measure_compact_memory")


def test_compact_saves_less_than_the_plain_inputs(script):
    hidden, layers, batch, seq, rank = 64, 2, 2, 32, 8
    result = script.measure(hidden=hidden, layers=layers, vocab=256, batch=batch, seq=seq, rank=rank)
    tokens, intermediate = batch * seq, hidden * 11 // 4
    # per block, down_proj's input (tokens × intermediate) is saved by it alone; CompAct keeps 7 z = x·Q instead
    assert result["plain"]["saved_bytes"] - result["compact"]["saved_bytes"] >= layers * tokens * (intermediate - 7 * rank) * 4
    assert result["compact"]["peak_bytes"] < result["plain"]["peak_bytes"]
    assert result["saved_ratio"] < 1 and result["peak_ratio"] < 1
