"""lit_lowrank: low-rank gradient optimizers (GaLore, Fira, APOLLO, Q-GaLore, ...) behind a
plugin API, for plain PyTorch and PyTorch Lightning.

Plugin authors need only this module (docs/plugins.md)::

    from lit_lowrank import hookimpl, DenseBasisProjector
"""

from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.inner.base import InnerOptimizer
from lit_lowrank.methods import Method
from lit_lowrank.optim.communication import LowRankCommunication, lowrank_comm_hook
from lit_lowrank.optim.factory import build_optimizer, select_targets
from lit_lowrank.optim.lowrank import LowRankOptimizer
from lit_lowrank.optim.sharding import shard_blocks
from lit_lowrank.plugins import (
    UnknownComponentError,
    get_inner_optimizer,
    get_method,
    get_projector,
    get_quantizer,
    get_schedule,
    get_transform,
    get_update_rule,
    register_plugin,
    registered,
)
from lit_lowrank.projectors.base import DenseBasisProjector, Projector, Side
from lit_lowrank.quantizers.base import Packed, Quantizer
from lit_lowrank.rules.base import RuleInputs, UpdateRule
from lit_lowrank.schedules.base import Schedule
from lit_lowrank.transforms.base import StoredWeight, Transform

__version__ = "0.1.0"

__all__ = [
    "DenseBasisProjector", "InnerOptimizer", "LowRankCommunication", "LowRankOptimizer", "Method", "Packed", "Projector",
    "Quantizer", "RuleInputs", "Schedule", "Side", "StoredWeight", "Transform", "UnknownComponentError", "UpdateRule",
    "build_optimizer", "get_inner_optimizer", "get_method", "get_projector", "get_quantizer", "get_schedule",
    "get_transform", "get_update_rule",
    "hookimpl", "lowrank_comm_hook", "register_plugin", "registered", "select_targets", "shard_blocks",
]
