"""``scripts/bench_optim.py`` on the tiny LLaMA: a row per baseline and registered method asked for,
ratios against the ``adamw`` row of the same run, and each method built with its transform."""

from __future__ import annotations

import statistics

import pytest
import torch

from lit_lowrank import LowRankOptimizer, select_targets

from script_loader import loaded_script

pytestmark = pytest.mark.slow  # each test runs the benchmark end to end


@pytest.fixture(scope="module")
def bench():
    yield from loaded_script("bench_optim")


def table(output: str) -> dict[str, list[str]]:
    rows = [line for line in output.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in row.split("|")[1:-1]] for row in rows[1:])}


def test_prints_a_row_per_method_with_ratios_of_the_same_run(bench, capsys):
    bench.main(["--size", "tiny", "--methods", "adamw", "galore", "q-galore", "--steps", "1", "--warmup", "0"])
    rows = table(capsys.readouterr().out)
    assert list(rows) == ["adamw", "galore", "q-galore"]
    for name in ("galore", "q-galore"):
        ms, ratio_ms, _, mib, ratio_mib = (float(value) for value in rows[name])
        adamw_ms = float(rows["adamw"][0])  # both printed to 0.1 ms, the ratio to 0.01: bound the rounding
        assert (ms - 0.05) / (adamw_ms + 0.05) - 0.005 <= ratio_ms <= (ms + 0.05) / (adamw_ms - 0.05) + 0.005
        assert ratio_mib == pytest.approx(mib / float(rows["adamw"][3]), abs=0.001)


def test_a_method_is_built_from_the_registry_with_its_transform(bench):
    model = bench.prepared_model("tiny", "q-galore", torch.float32, "cpu")
    optimizer = bench.method_factory("q-galore")(model)
    assert isinstance(optimizer, LowRankOptimizer)
    group = optimizer.param_groups[0]
    assert (group["inner"], group["schedule"], group["rank"]) == ("adamw8bit", "lazy", 128)
    assert all(hasattr(p, "weight_store") for p in group["params"])  # INT8 weights, as the method trains


def test_cuda_without_a_gpu_is_refused(bench):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        bench.main(["--device", "cuda", "--methods", "adamw"])


def test_mixtral_experts_and_cnn_kernels_get_rows_and_refusals_are_reported(bench, capsys):
    bench.main(["--model", "mixtral", "--size", "tiny", "--methods", "adamw", "galore", "galore-dct",
                "--steps", "1", "--warmup", "0"])
    output = capsys.readouterr().out
    assert list(table(output)) == ["adamw", "galore"]
    assert "galore-dct: refused (stacked expert weights (layout: experts) need a batched projector" in output
    bench.main(["--model", "cnn", "--methods", "adamw", "galore-tucker", "--steps", "1", "--warmup", "0"])
    rows = table(capsys.readouterr().out)
    assert list(rows) == ["adamw", "galore-tucker"] and float(rows["galore-tucker"][4]) < 1


def test_the_cnn_targets_are_its_3x3_kernels(bench):
    model = bench.network("cnn", "tiny")
    optimizer = bench.method_factory("galore")(model)
    kernels = [g for g in optimizer.param_groups if g.get("layout") == "kernel"]
    assert len(kernels) == 1 and len(kernels[0]["params"]) == 8
    assert all(p.shape[-2:] == (3, 3) for p in kernels[0]["params"])


class StepClock:
    """A clock whose every call takes as many seconds as calls were timed before it: step k takes k s."""

    def __init__(self, device) -> None:
        self.calls = 0

    def time(self, call) -> float:
        call()
        self.calls += 1
        return float(self.calls - 1)


def test_the_cycle_is_steps_t_to_2t_minus_1_and_the_steady_step_1_to_t_minus_1(bench, monkeypatch):
    model = bench.prepared_model("tiny", "galore", torch.float32, "cpu")
    monkeypatch.setattr(bench, "Clock", StepClock)
    gap = 5
    result = bench.measure_cycle(model, bench.cycle_factory("svd", False, gap), gap)
    steady, cycle = [1, 2, 3, 4], range(gap, 2 * gap)
    assert result["steady_ms"] == pytest.approx(1e3 * 2.5)  # the median of steps 1 … 4
    assert result["steady_mean_ms"] == pytest.approx(1e3 * sum(steady) / len(steady))
    assert result["worst_ms"] == pytest.approx(1e3 * (2 * gap - 1))
    assert result["amortized_ms"] == pytest.approx(1e3 * sum(cycle) / gap)
    assert result["median_ms"] == pytest.approx(1e3 * statistics.median(cycle))
    assert result["refreshes"] == target_count(model)  # every weight once, at step T


def target_count(model) -> int:
    """The weights GaLore projects: the default targets."""
    return len(select_targets(model)[0])


@pytest.mark.parametrize("stagger", [False, True])
def test_a_cycle_refreshes_every_weight_once_staggered_or_not(bench, stagger):
    model = bench.prepared_model("tiny", "galore", torch.float32, "cpu")
    gap = 3
    optimizer = bench.cycle_factory("rsvd", stagger, gap)(model)
    refreshed = []
    for _ in range(2 * gap):
        before = optimizer.refresh_count
        optimizer.step()
        refreshed.append(optimizer.refresh_count - before)
    weights = target_count(model)
    assert refreshed[0] == weights and sum(refreshed[1:gap]) == 0 and sum(refreshed[gap:]) == weights
    assert max(refreshed[gap:]) == (weights if not stagger else -(-weights // gap))


def test_cycle_table_has_a_row_per_projector_and_stagger(bench, capsys):
    bench.main(["--cycle", "--size", "tiny", "--gap", "2", "--projectors", "svd", "rsvd"])
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "---" not in line][1:]
    assert [row[:2] for row in rows] == [["svd", "no"], ["svd", "yes"], ["rsvd", "no"], ["rsvd", "yes"]]
    weights = target_count(bench.prepared_model("tiny", "galore", torch.float32, "cpu"))
    for row in rows:
        steady, median, worst, ratio, amortized = (float(value) for value in row[2:7])
        assert worst >= median and ratio == pytest.approx(worst / median, abs=0.006)
        share = float(row[7].rstrip(" %"))  # ms printed to 0.1, the share to 0.1 %: bound the rounding
        low, high = (amortized - 0.05) / (steady + 0.05), (amortized + 0.05) / (steady - 0.05)
        assert 100 * (low - 1) - 0.05 <= share <= 100 * (high - 1) + 0.05
        assert int(row[8]) == weights


def test_a_gap_under_2_is_refused(bench):
    with pytest.raises(SystemExit):
        bench.main(["--cycle", "--gap", "1"])
