"""Models for pretraining: LLaMA by named size."""

from lit_lowrank.models.llama import LLAMA_SIZES, Llama, llama_config

__all__ = ["LLAMA_SIZES", "Llama", "llama_config"]
