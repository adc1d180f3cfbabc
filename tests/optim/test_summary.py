"""The low-rank summary: rows (rank after clamping, side, reasons) and the predicted optimizer
state, against the state measured after a step and memory.py's closed-form estimate."""

from __future__ import annotations

import pytest
import torch

from lit_lowrank import build_optimizer
from lit_lowrank.memory import estimate, llama_on_meta
from lit_lowrank.models import Llama
from lit_lowrank.optim.summary import summarize


def test_summary_rows_and_predicted_bytes_on_a_tiny_llama():
    model = Llama("tiny", vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=2, num_layers=2)
    optimizer = build_optimizer(model, rank=40, update_gap=5)
    with pytest.warns(UserWarning, match="clamped"):
        summary = summarize(model, optimizer)
        tokens = torch.randint(0, 64, (2, 9))
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
    rows = {row.name: row for row in summary.rows}
    q, down = rows["model.layers.0.self_attn.q_proj.weight"], rows["model.layers.1.mlp.down_proj.weight"]
    assert (q.shape, q.rank, q.side) == ((32, 32), 32, "right")  # rank 40 clamped to min(32, 32)
    assert (down.shape, down.rank, down.side) == ((32, 64), 32, "left")  # std: project the smaller side
    assert rows["model.embed_tokens.weight"].reason == "embedding"
    assert rows["lm_head.weight"].reason == "output head"
    assert sum(row.reason is None for row in summary.rows) == 14
    assert summary.state_bytes == sum(optimizer.state_bytes().values())  # predicted = measured after a step
    assert summary.adamw_bytes == 2 * 4 * sum(p.numel() for p in model.parameters())
    text = str(summary)
    assert "model.layers.0.self_attn.q_proj.weight | 32×32 | 32" in text and "output head" in text


def test_predicted_bytes_equal_the_closed_form_estimate_on_llama_60m():
    model = llama_on_meta("60m", dtype=torch.float32)  # shapes only, no memory
    summary = summarize(model, build_optimizer(model, rank=128))
    assert summary.state_bytes == estimate(model, "galore", rank=128).optimizer
    assert summary.adamw_bytes == estimate(model, "adamw", rank=128).optimizer


@pytest.mark.parametrize("options", [
    {"projector": "dct"}, {"projector": "dct", "projector_args": {"cache_basis": False}},
    {"projector": "random", "rule": "apollo", "scale": 1.0}, {"projector": "rsvd", "rule": "fira"},
], ids=["dct", "dct-uncached", "apollo", "fira-rsvd"])
def test_predicted_bytes_count_what_projectors_keep_resident(options):
    """DCT and random projectors cache a dense basis beside their state dict: counted as measured."""
    model = Llama("tiny", vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=2, num_layers=2)
    optimizer = build_optimizer(model, rank=8, **options)
    summary = summarize(model, optimizer)
    tokens = torch.randint(0, 64, (2, 9))
    model(tokens, labels=tokens).loss.backward()
    optimizer.step()
    assert summary.state_bytes == sum(optimizer.state_bytes().values())


@pytest.mark.parametrize("options", [{}, {"projector": "random", "rule": "apollo", "scale": 1.0}],
                         ids=["galore", "apollo"])
def test_predicted_bytes_of_expert_stacks_equal_the_measured(options):
    from lit_lowrank.models import Mixtral

    model = Mixtral("tiny", vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=2, num_layers=1)
    optimizer = build_optimizer(model, rank=4, **options)
    summary = summarize(model, optimizer)
    rows = {row.name: row for row in summary.rows}
    assert rows["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 96, 32)
    tokens = torch.randint(0, 64, (2, 9))
    model(tokens, labels=tokens).loss.backward()
    optimizer.step()
    assert summary.state_bytes == sum(optimizer.state_bytes().values())
    if options:  # the rule's state made at the first step is predicted: APOLLO's limiter norm per expert
        unlimited = summarize(model, build_optimizer(model, rank=4, **options, rule_args={"gamma": None}))
        assert summary.state_bytes - unlimited.state_bytes == 4 * 4 * 2  # float32 × 4 experts × 2 stacks


def test_predicted_bytes_of_conv_kernels_equal_the_measured_matricized_and_tucker():
    for projector in ("svd", "tucker"):
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 6, 3), torch.nn.Flatten())
        optimizer = build_optimizer(model, targets=["0", "1"], rank=2, projector=projector)
        summary = summarize(model, optimizer, targets=["0", "1"])
        assert {row.side for row in summary.rows if row.reason is None} == ({"modes"} if projector == "tucker"
                                                                             else {"left"})
        model(torch.randn(2, 3, 7, 7)).sum().backward()
        optimizer.step()
        assert summary.state_bytes == sum(optimizer.state_bytes().values()), projector
