"""Default target selection on real transformers models (LLaMA and BERT classes)."""

from __future__ import annotations

import re

import pytest

transformers = pytest.importorskip("transformers")

from lit_lowrank import select_targets  # noqa: E402


def _strip_layer(name: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", name)


def test_llama_targets_attention_and_mlp_weights():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4)
    model = transformers.LlamaForCausalLM(config)
    low_rank, dense = select_targets(model)
    assert {_strip_layer(n) for n in low_rank} == {
        f"model.layers.N.{block}.weight"
        for block in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }
    assert len(low_rank) == 2 * 7
    assert {_strip_layer(n) for n in dense} == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                                                "model.layers.N.input_layernorm.weight",
                                                "model.layers.N.post_attention_layernorm.weight"}


def test_bert_targets_attention_intermediate_and_output_weights():
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_labels=3)
    model = transformers.BertForSequenceClassification(config)
    low_rank, dense = select_targets(model)
    assert {_strip_layer(n) for n in low_rank} == {
        f"bert.encoder.layer.N.{block}.weight"
        for block in ("attention.self.query", "attention.self.key", "attention.self.value",
                      "attention.output.dense", "intermediate.dense", "output.dense")
    }
    assert "classifier.weight" in dense and "bert.pooler.dense.weight" in dense
    assert not any("embeddings" in n for n in low_rank)
