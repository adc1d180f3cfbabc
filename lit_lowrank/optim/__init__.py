"""The optimizer core: plain PyTorch, no Lightning (usable from any training loop)."""

from lit_lowrank.optim.factory import DEFAULT_EXCLUDE, DEFAULT_TARGETS, build_optimizer, select_targets
from lit_lowrank.optim.layerwise import LayerwiseUpdates
from lit_lowrank.optim.lowrank import LowRankOptimizer

__all__ = ["DEFAULT_EXCLUDE", "DEFAULT_TARGETS", "LayerwiseUpdates", "LowRankOptimizer", "build_optimizer",
           "select_targets"]
