"""Inner optimizers: moment updates in low-rank space (AdamW, Adafactor, Lion, 8-bit Adam)."""

from lit_lowrank.inner.base import ON_REFRESH, InnerOptimizer, change_basis

__all__ = ["ON_REFRESH", "InnerOptimizer", "change_basis"]
