"""LLaMA decoders by named size, as in GaLore's pretraining table (Zhao et al. 2024,
Table 11), built with ``transformers.LlamaConfig``/``LlamaForCausalLM`` and random init."""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig, LlamaForCausalLM

# size: (hidden, intermediate, attention heads, layers)
LLAMA_SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (128, 344, 4, 4),  # the CPU demo, not from the paper
    "20m": (256, 688, 4, 4),  # GaLore's and ReLoRA's smallest
    "60m": (512, 1376, 8, 8),
    "130m": (768, 2048, 12, 12),
    "350m": (1024, 2736, 16, 24),
    "1b": (2048, 5461, 32, 24),
    "7b": (4096, 11008, 32, 32),
}
GALORE_RANKS: dict[str, int] = {"tiny": 16, "20m": 64, "60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}
"""The GaLore papers' rank per size (20M and tiny: a quarter of the hidden size, as at 60M)."""


def llama_config(size: str, *, vocab_size: int = 32000, max_seq_len: int = 1024, **overrides: Any) -> LlamaConfig:
    """The ``LlamaConfig`` of a named size (GaLore's: RMSNorm ε 1e-6, SiLU, untied embeddings,
    init std 0.02). ``overrides`` set any other ``LlamaConfig`` field.

    Raises:
        ValueError: for an unknown size (the message lists the known ones).
    """
    if size not in LLAMA_SIZES:
        raise ValueError(f"unknown LLaMA size {size!r}; expected one of {list(LLAMA_SIZES)}")
    hidden, intermediate, heads, layers = LLAMA_SIZES[size]
    fields = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                  num_attention_heads=heads, num_key_value_heads=heads, num_hidden_layers=layers,
                  max_position_embeddings=max_seq_len, rms_norm_eps=1e-6, hidden_act="silu",
                  initializer_range=0.02, tie_word_embeddings=False, use_cache=False)
    fields.update(overrides)
    return LlamaConfig(**fields)


class Llama(LlamaForCausalLM):
    """A randomly initialised ``LlamaForCausalLM`` of a named size; usable as a YAML
    ``class_path`` (``lit_lowrank.models.Llama`` with ``init_args: {size: 60m}``).

    Args:
        size: one of :data:`LLAMA_SIZES` (``tiny``, ``60m``, ``130m``, ``350m``, ``1b``, ``7b``).
        vocab_size: must equal the tokenizer's vocabulary size (the data module's).
        max_seq_len: rotary-embedding length (≥ the training sequence length).
        hidden_size, intermediate_size, num_heads, num_layers: override the size's shape.
        overrides: other ``LlamaConfig`` fields (Python only; YAML takes the named arguments).
    """

    def __init__(self, size: str = "tiny", vocab_size: int = 32000, max_seq_len: int = 1024, *,
                 hidden_size: int | None = None, intermediate_size: int | None = None,
                 num_heads: int | None = None, num_layers: int | None = None, **overrides: Any) -> None:
        overrides.update(shape_overrides(hidden_size, intermediate_size, num_heads, num_layers))
        super().__init__(llama_config(size, vocab_size=vocab_size, max_seq_len=max_seq_len, **overrides))


def shape_overrides(hidden_size: int | None, intermediate_size: int | None, num_heads: int | None,
                    num_layers: int | None) -> dict[str, int]:
    """The ``LlamaConfig`` fields of the shape arguments that are set (YAML's named overrides)."""
    shape = dict(hidden_size=hidden_size, intermediate_size=intermediate_size,
                 num_attention_heads=num_heads, num_key_value_heads=num_heads, num_hidden_layers=num_layers)
    return {key: value for key, value in shape.items() if value is not None}
