"""``scripts/bench_optim.py`` on the tiny LLaMA: a row per baseline and registered method asked for,
ratios against the ``adamw`` row of the same run, and each method built with its transform."""

from __future__ import annotations


import pytest
import torch

from lit_lowrank import LowRankOptimizer

from script_loader import loaded_script


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
