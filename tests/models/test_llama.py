"""Named LLaMA sizes: shapes from GaLore's table and parameter counts from the closed form."""

from __future__ import annotations

import pytest

from lit_lowrank.models import LLAMA_SIZES, Llama, llama_config


def llama_param_count(vocab: int, hidden: int, inter: int, layers: int) -> int:
    """Embedding + untied head + per layer (4 attention, 3 MLP matrices, 2 RMSNorms) + final norm."""
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    return 2 * vocab * hidden + layers * per_layer + hidden


@pytest.mark.parametrize("size", list(LLAMA_SIZES))
def test_config_matches_table(size):
    hidden, inter, heads, layers = LLAMA_SIZES[size]
    config = llama_config(size, vocab_size=32000)
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads,
            config.num_hidden_layers) == (hidden, inter, heads, layers)
    assert not config.tie_word_embeddings


def test_paper_sizes():
    assert LLAMA_SIZES["60m"] == (512, 1376, 8, 8)
    assert LLAMA_SIZES["1b"] == (2048, 5461, 32, 24)


def test_parameter_count_closed_form():
    model = Llama("tiny", vocab_size=300)
    assert sum(p.numel() for p in model.parameters()) == llama_param_count(300, *LLAMA_SIZES["tiny"][:2], 4)


def test_shape_arguments_override_the_size():
    model = Llama("tiny", vocab_size=50, hidden_size=32, intermediate_size=40, num_heads=2, num_layers=1)
    assert model.config.num_attention_heads == model.config.num_key_value_heads == 2
    assert sum(p.numel() for p in model.parameters()) == llama_param_count(50, 32, 40, 1)


def test_overrides_and_unknown_size():
    assert llama_config("tiny", num_hidden_layers=3).num_hidden_layers == 3
    with pytest.raises(ValueError, match="expected one of"):
        llama_config("13b")
