"""Inner optimizers: moment updates in low-rank space (AdamW, Adafactor, Lion, 8-bit Adam)."""

from lit_lowrank.inner.base import InnerOptimizer, change_basis

__all__ = ["InnerOptimizer", "change_basis"]
