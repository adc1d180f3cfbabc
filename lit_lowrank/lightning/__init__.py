"""Lightning integration: :class:`LowRankModule` (wrap any network), :class:`LowRankCallback`
and the ``"lowrank"``/``"ddp_lowrank"``/``"fsdp_lowrank"`` strategies (adopt in an existing project), telemetry,
and :class:`LastStepCheckpoint` (checkpoints that always include the final step)."""

from lit_lowrank.extras import require

require("lightning", "lightning", "torchmetrics", "jsonargparse")

from lit_lowrank.lightning.callback import LowRankCallback
from lit_lowrank.lightning.checkpoint import LastStepCheckpoint
from lit_lowrank.lightning.communication import LowRankCommunicationCallback
from lit_lowrank.lightning.config import LowRankConfig
from lit_lowrank.lightning.layerwise import LayerwiseCallback
from lit_lowrank.lightning.module import LowRankModule
from lit_lowrank.lightning.strategy import DDPLowRankStrategy, FSDPLowRankStrategy, LowRankStrategy, register_strategies
from lit_lowrank.lightning.tasks import CausalLM, SequenceClassification, Task, TaskOutput
from lit_lowrank.lightning.telemetry import LowRankTelemetry

register_strategies()

__all__ = ["CausalLM", "DDPLowRankStrategy", "FSDPLowRankStrategy", "LastStepCheckpoint", "LayerwiseCallback",
           "LowRankCallback", "LowRankCommunicationCallback", "LowRankConfig", "LowRankModule", "LowRankStrategy",
           "LowRankTelemetry", "SequenceClassification", "Task", "TaskOutput"]
