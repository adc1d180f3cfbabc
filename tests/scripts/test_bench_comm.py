"""``scripts/bench_comm.py``: the on-paper traffic against the shapes written out here, and a
measured run on the tiny LLaMA whose bytes equal what each mode must send."""

from __future__ import annotations

import pytest

from lit_lowrank.models.llama import GALORE_RANKS, LLAMA_SIZES
from ranks import requires_gloo
from script_loader import loaded_script

pytestmark = pytest.mark.slow  # each test runs the benchmark end to end


@pytest.fixture(scope="module")
def bench():
    yield from loaded_script("bench_comm")


def _llama_bytes(size: str, vocab: int = 32000) -> dict[str, int]:
    """fp32 gradient bytes of LLaMA-``size``: all parameters, its 7 linear targets per layer,
    and their projections R at the papers' rank (r·max(m, n) each)."""
    hidden, ff, _, layers = LLAMA_SIZES[size]
    rank = GALORE_RANKS[size]
    targets = layers * (4 * hidden * hidden + 3 * hidden * ff)
    dense = 2 * vocab * hidden + (2 * layers + 1) * hidden  # embedding, head, RMSNorm weights
    low = layers * (4 * rank * hidden + 3 * rank * max(hidden, ff))
    return {"all": 4 * (targets + dense), "targets": 4 * targets, "low": 4 * low, "dense": 4 * dense}


@pytest.mark.parametrize("size", ["60m", "7b"])
def test_paper_traffic_matches_the_shapes(bench, size):
    expected = _llama_bytes(size)
    result = bench.paper_traffic(size)
    assert result["full_bytes"] == expected["all"]
    assert result["steady_bytes"] == expected["low"] + expected["dense"]
    assert result["target_share"] == pytest.approx(expected["targets"] / expected["all"])
    assert result["amortized_bytes"] == pytest.approx((199 * result["steady_bytes"] + expected["all"]) / 200)
    assert all(s["ratio"] == GALORE_RANKS[size] / min(s["shape"]) for s in result["shapes"])


@requires_gloo
def test_measured_bytes_and_weights(bench, capsys):
    rows = {row["mode"]: row for row in bench.measure("tiny", steps=2, warmup=1, seq=16)}
    expected = _llama_bytes("tiny", vocab=1024)
    assert rows["ddp"]["bytes"] == expected["all"]
    for mode in ("ddp + lowrank", "layer-wise + lowrank"):
        assert rows[mode]["bytes"] == expected["low"] + expected["dense"]
        assert rows[mode]["weight_distance"] < 1e-5
    table = bench.measured_table(list(rows.values()))
    assert table.count("\n") == 4 and "| ddp | " in table
