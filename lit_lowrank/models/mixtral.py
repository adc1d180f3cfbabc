"""A Mixtral-style mixture-of-experts LLaMA by named size: transformers' ``MixtralForCausalLM``,
whose experts are fused 3-D parameters (E×m×n) that the optimizer projects per expert."""

from __future__ import annotations

from typing import Any

from transformers import MixtralConfig, MixtralForCausalLM

from lit_lowrank.models.llama import llama_config, shape_overrides


class Mixtral(MixtralForCausalLM):
    """A randomly initialised ``MixtralForCausalLM`` with the shape of a named LLaMA size and
    ``num_experts`` feed-forward experts per layer, ``experts_per_token`` of them routed to each
    token; usable as a YAML ``class_path`` (``lit_lowrank.models.Mixtral``).

    Args:
        size: one of :data:`~lit_lowrank.models.LLAMA_SIZES` (the attention and expert shapes).
        vocab_size: must equal the tokenizer's vocabulary size (the data module's).
        max_seq_len: rotary-embedding length (≥ the training sequence length).
        num_experts, experts_per_token: E and the router's top-k.
        hidden_size, intermediate_size, num_heads, num_layers: override the size's shape
            (``intermediate_size`` is each expert's).
        overrides: other ``MixtralConfig`` fields (Python only; YAML takes the named arguments).
    """

    def __init__(self, size: str = "tiny", vocab_size: int = 32000, max_seq_len: int = 1024, *,
                 num_experts: int = 4, experts_per_token: int = 2, hidden_size: int | None = None,
                 intermediate_size: int | None = None, num_heads: int | None = None, num_layers: int | None = None,
                 **overrides: Any) -> None:
        if not 1 <= experts_per_token <= num_experts:
            raise ValueError(f"experts_per_token must be in [1, num_experts={num_experts}], got {experts_per_token}")
        shape = shape_overrides(hidden_size, intermediate_size, num_heads, num_layers)
        fields = llama_config(size, vocab_size=vocab_size, max_seq_len=max_seq_len, **shape).to_diff_dict()
        fields.update(model_type="mixtral", num_local_experts=num_experts, num_experts_per_tok=experts_per_token,
                      **overrides)
        super().__init__(MixtralConfig(**fields))
