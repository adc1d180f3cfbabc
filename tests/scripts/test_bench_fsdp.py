"""``scripts/bench_fsdp.py``: the on-paper traffic against the shapes written out here, and a
measured run on the tiny LLaMA whose counted bytes and per-rank state equal what the sharded step
must exchange and keep."""

from __future__ import annotations

import pytest

from lit_lowrank.models.llama import GALORE_RANKS, LLAMA_SIZES
from ranks import requires_gloo
from script_loader import loaded_script

pytestmark = pytest.mark.slow  # each test runs the benchmark end to end


@pytest.fixture(scope="module")
def bench():
    yield from loaded_script("bench_fsdp")


@pytest.mark.parametrize("size", ["60m", "7b"])
def test_paper_traffic_matches_the_shapes(bench, size):
    hidden, ff, _, layers = LLAMA_SIZES[size]
    rank, vocab = GALORE_RANKS[size], 32000
    params = layers * (4 * hidden * hidden + 3 * hidden * ff) + 2 * vocab * hidden + (2 * layers + 1) * hidden
    result = bench.paper_traffic(size)
    assert result["fsdp"] == 3 * 4 * params
    assert result["refresh"] == pytest.approx(4 * layers * (4 * hidden * hidden + 3 * hidden * ff) / 200)
    assert result["left"] == 4 * layers * 2 * rank * ff  # down_proj (hidden × ff) is the one left-projected target


@requires_gloo
def test_measured_traffic_and_state(bench):
    results = bench.measure("tiny", steps=2, warmup=1, seq=16)
    hidden, ff, _, layers = LLAMA_SIZES["tiny"]
    rank = GALORE_RANKS["tiny"]
    assert results["adamw"]["bytes"] == results["adamw"]["refresh_bytes"] == 0
    left = 4 * layers * 2 * rank * ff + 8  # R all-reduced and N all-gathered for each down_proj; the NaN check
    assert results["galore"]["bytes"] == left
    # refresh_sharing (auto under FSDP): each weight's G is gathered on its owner only, so a rank
    # sends or receives the other rank's half of the rows of every target, not the whole m×n; then
    # the owner broadcasts each target's basis (r × min(m, n) = r × hidden floats) and its two
    # int64 counters
    gathered = 4 * layers * (4 * hidden * hidden + 3 * hidden * ff) // 2
    broadcast = 7 * layers * (4 * rank * hidden + 16)
    assert results["galore"]["refresh_bytes"] == left + gathered + broadcast
    norms = 4 * 7 * layers  # the limiter's norm of each target, every step
    assert results["apollo"]["bytes"] == results["apollo"]["refresh_bytes"] == left + norms  # a seeded basis: no gather
    assert results["galore"]["state"] < results["adamw"]["state"]
    assert bench.measured_table(results).count("\n") == 1 + len(bench.METHODS)
