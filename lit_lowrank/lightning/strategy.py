"""The ``"lowrank"``, ``"ddp_lowrank"`` and ``"fsdp_lowrank"`` strategies:
``Trainer(strategy="lowrank")`` trains an existing LightningModule with LowRankOptimizers in place
of the optimizers it configures.

Registered in Lightning's ``StrategyRegistry`` when :mod:`lit_lowrank.lightning` is imported.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy, StrategyRegistry
from typing_extensions import override

from lit_lowrank.lightning.adoption import Adoption
from lit_lowrank.lightning.config import LowRankConfig
from lit_lowrank.lightning.layerwise import LayerwiseCallback
from lit_lowrank.lightning.module import LowRankModule
from lit_lowrank.lightning.refusals import check_module_options
from lit_lowrank.optim.communication import sync_module_states
from lit_lowrank.optim.lowrank import LowRankOptimizer


class _LowRankOptimizers:
    """Mixin: adopt the module through :class:`~lit_lowrank.lightning.adoption.Adoption`, as
    :class:`~lit_lowrank.lightning.LowRankCallback` does, from the strategy's own hooks: before
    setup, refuse what the strategy cannot train and apply the model transforms of the config
    (``transforms``); after the wrapped strategy built the module's optimizers, add the callbacks
    the run needs (:class:`~lit_lowrank.lightning.LowRankTelemetry` unless the trainer already logs it;
    :class:`~lit_lowrank.lightning.layerwise.LayerwiseCallback` for ``layerwise=True``,
    :class:`~lit_lowrank.lightning.communication.LowRankCommunicationCallback` for
    ``communication="lowrank"``) and convert the optimizers. A
    :class:`~lit_lowrank.lightning.LowRankModule` is trained with its own ``lowrank`` section."""

    adoption: Adoption
    lowrank: LowRankConfig
    """The config of the run: the adoption's, or a LowRankModule's own."""

    def _adopt_with(self, config: LowRankConfig | None, options: dict[str, Any]) -> None:
        self.adoption = Adoption(config, options)
        self.lowrank = self.adoption.config

    @override
    def connect(self, model: pl.LightningModule) -> None:
        super().connect(model)  # type: ignore[misc]
        if isinstance(model, LowRankModule):  # it builds its own LowRankOptimizer from its lowrank section
            check_module_options(self.strategy_name, self.adoption.explicit)
            self.lowrank = model.lowrank
            return
        self.adoption.prepare(self, model)  # before configure_optimizers and checkpoint restoring

    @override
    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        super().setup_optimizers(trainer)  # type: ignore[misc]
        if isinstance(self.lightning_module, LowRankModule):
            return  # its optimizer and callbacks come from its own config
        trainer.callbacks.extend(self.adoption.callbacks(trainer, self.lightning_module))
        self.adoption.convert(self, self.lightning_module)


class LowRankStrategy(_LowRankOptimizers, SingleDeviceStrategy):
    """Single-device training with LowRankOptimizers.

    Args:
        lowrank: the :class:`LowRankConfig`; as for :class:`~lit_lowrank.lightning.LowRankCallback`,
            ``lr``/``betas``/``eps``/``weight_decay`` and the LR-schedule fields are refused (the
            module's optimizer and scheduler own them).
        device: default ``cuda:0`` if available, else ``cpu``.
        options: :class:`LowRankConfig` fields (e.g. ``rank=128``) on top of ``lowrank``.
    """

    strategy_name = "lowrank"

    def __init__(self, lowrank: LowRankConfig | None = None, device: str | torch.device | None = None,
                 **options: Any) -> None:
        device = device or ("cuda:0" if torch.cuda.is_available() else "cpu")
        super().__init__(device=device)
        self._adopt_with(lowrank, options)


class DDPLowRankStrategy(_LowRankOptimizers, DDPStrategy):
    """DDP with LowRankOptimizers: gradients are all-reduced before the step, so every rank
    computes the same SVD and holds the same projectors. ``ddp_kwargs`` go to ``DDPStrategy``.

    ``communication="lowrank"`` all-reduces ``R = PᵀG`` of target weights between refreshes.
    In layer-wise mode (``layerwise=True``, or a LowRankModule whose config says so) the model is
    not wrapped in DistributedDataParallel: its weights are broadcast from rank 0 once, and the
    per-parameter hooks all-reduce each gradient themselves inside backward
    (:class:`~lit_lowrank.optim.layerwise.LayerwiseUpdates`). Also trains a
    :class:`~lit_lowrank.lightning.LowRankModule`, with the options of its own ``lowrank`` section.
    """

    strategy_name = "ddp_lowrank"

    def __init__(self, lowrank: LowRankConfig | None = None, ddp_kwargs: dict[str, Any] | None = None,
                 **options: Any) -> None:
        super().__init__(**(ddp_kwargs or {}))
        self._adopt_with(lowrank, options)

    def reduces_in_backward(self) -> bool:
        """Whether layer-wise hooks reduce the gradients (then the model is not DDP-wrapped)."""
        trainer = self.lightning_module.trainer
        return (self.lowrank.enabled and self.lowrank.layerwise) or any(
            isinstance(callback, LayerwiseCallback) for callback in trainer.callbacks)

    @override
    def _setup_model(self, model: nn.Module) -> nn.Module:
        if self.reduces_in_backward():
            sync_module_states(model)  # what DDP does when it wraps a model
            return model
        return super()._setup_model(model)

    @override
    def _register_ddp_hooks(self) -> None:
        if isinstance(self.model, DistributedDataParallel):
            super()._register_ddp_hooks()

    @override
    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        """Tell each LowRankOptimizer that its gradients are averaged over the ranks (DDP, or the
        layer-wise hooks), so ``refresh_sharing: auto`` shares the refreshes."""
        super().setup_optimizers(trainer)
        for optimizer in self.optimizers:
            if isinstance(optimizer, LowRankOptimizer):
                optimizer.gradients_identical = True


class FSDPLowRankStrategy(_LowRankOptimizers, ModelParallelStrategy):
    """FSDP2 with LowRankOptimizers: Lightning's ``ModelParallelStrategy`` with every process in
    one data-parallel mesh, so each target weight is split by rows over all ranks (see
    :mod:`lit_lowrank.optim.sharding` for what each rank computes and what it exchanges).

    The module shards itself in ``configure_model``, as Lightning requires:
    :class:`~lit_lowrank.lightning.LowRankModule` does (:func:`~lit_lowrank.shard_blocks`);
    your own module calls ``shard_blocks(self.model, self.device_mesh["data_parallel"])`` or
    ``fully_shard`` itself.

    Args:
        lowrank, options: as for :class:`DDPLowRankStrategy`; ``layerwise``,
            ``communication: lowrank`` and transforms that need whole weights (``int-weights``, ``weight-norm``, ``compact``) are refused
            (each needs whole weights or gradients on every rank).
        save_distributed_checkpoint: each rank writes its shards (True, a folder) or rank 0 one
            whole file (False); both resume exactly.
        process_group_backend: default ``nccl`` on GPUs, ``gloo`` on the CPU.
    """

    strategy_name = "fsdp_lowrank"

    def __init__(self, lowrank: LowRankConfig | None = None, save_distributed_checkpoint: bool = True,
                 process_group_backend: str | None = None, **options: Any) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend)
        self._adopt_with(lowrank, options)

    @override
    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def register_strategies() -> None:
    """Add ``lowrank``, ``ddp_lowrank`` and ``fsdp_lowrank`` to Lightning's StrategyRegistry (idempotent)."""
    for cls, description in ((LowRankStrategy, "single device, LowRankOptimizer in place of the module's"),
                             (DDPLowRankStrategy, "DDP, LowRankOptimizer in place of the module's"),
                             (FSDPLowRankStrategy, "FSDP2 (fully_shard), LowRankOptimizer in place of the module's")):
        if cls.strategy_name not in StrategyRegistry:
            StrategyRegistry.register(cls.strategy_name, cls, description=description)
