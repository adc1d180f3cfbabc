"""``LowRankTelemetry``: per-step learning rate, optimizer-state bytes and subspace refreshes."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lit_lowrank.lightning.config import LowRankConfig
from lit_lowrank.optim.lowrank import LowRankOptimizer, tensor_bytes
from lit_lowrank.optim.summary import summarize


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """``LowRankOptimizer.state_bytes()``; for any other optimizer, all its state tensors as
    ``dense`` — so a full-rank AdamW baseline reports comparable figures."""
    if isinstance(optimizer, LowRankOptimizer):
        return optimizer.state_bytes()
    return {"moments": 0, "projectors": 0, "dense": sum(tensor_bytes(state) for state in optimizer.state.values())}


class LowRankTelemetry(Callback):
    """Logs after every optimizer step, for the first optimizer of the run:

    * ``train/lr`` — the first param group's learning rate used by this step's update (read
      before the optimizer step, so before the LR scheduler moves it);
    * ``optim/state_bytes`` and ``optim/{moments,projectors,dense}_bytes``;
    * ``optim/refreshes`` — subspace refreshes so far (low-rank optimizers only);
    * ``optim/skipped_steps`` — steps skipped for a non-finite gradient (``nonfinite: skip``);
    * ``optim/comm_bytes`` — bytes this rank all-reduced for the step's gradients, when
      lit_lowrank communicates them (``communication: lowrank``, layer-wise under DDP), plus
      what the low-rank step exchanged itself: for weights sharded by FSDP, and the projector
      states broadcast under refresh sharing (alone under plain DDP: 0 on a step without one);
    * ``optim/layers/<param name>/{rank,refreshes}`` — each projected weight's rank and its own
      refresh (SVD) count, on the steps where some subspace was refreshed (adaptive rank and
      Q-GaLore's lazy schedule make these differ between layers).

    At fit start it prints (rank zero) the low-rank summary of
    :func:`~lit_lowrank.optim.summary.summarize`: projected weights, dense weight matrices and
    why, predicted optimizer-state bytes against AdamW.

    ``LowRankModule`` adds it automatically; add it to ``Trainer(callbacks=...)`` otherwise.
    """

    def __init__(self) -> None:
        self._last_refresh_count = -1
        self._step_lr: float | None = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        if isinstance(optimizer, LowRankOptimizer):
            # the LowRankConfig of LowRankCallback, LowRankModule or the lowrank strategies
            owners = ((self, "config"), (pl_module, "lowrank"), (trainer.strategy, "lowrank"))
            configs = [getattr(o, key) for o, key in owners if isinstance(getattr(o, key, None), LowRankConfig)]
            targets, exclude = (configs[0].targets, configs[0].exclude) if configs else (None, ())
            rank_zero_info(f"Low-rank summary:\n{summarize(pl_module, optimizer, targets, exclude)}")

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if trainer.optimizers and optimizer is trainer.optimizers[0]:
            self._step_lr = float(optimizer.param_groups[0]["lr"])

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if not trainer.optimizers:
            return
        optimizer = trainer.optimizers[0]
        sizes = optimizer_state_bytes(optimizer)
        lr = self._step_lr if self._step_lr is not None else optimizer.param_groups[0]["lr"]
        metrics = {"train/lr": float(lr), "optim/state_bytes": float(sum(sizes.values()))}
        metrics.update({f"optim/{role}_bytes": float(size) for role, size in sizes.items()})
        if isinstance(optimizer, LowRankOptimizer):
            metrics["optim/refreshes"] = float(optimizer.refresh_count)
            metrics["optim/skipped_steps"] = float(optimizer.skipped_steps)
            if optimizer.comm_bytes is not None:
                metrics["optim/comm_bytes"] = float(optimizer.comm_bytes)
            if optimizer.refresh_count != self._last_refresh_count:
                metrics.update(layer_metrics(optimizer))
                self._last_refresh_count = optimizer.refresh_count
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)


def layer_metrics(optimizer: LowRankOptimizer) -> dict[str, float]:
    """``optim/layers/<name>/rank`` and ``.../refreshes`` per projected weight, named by the
    param group's ``names`` (``build_optimizer`` sets them) or else by parameter index."""
    names = {p: name for group in optimizer.param_groups for p, name in zip(group["params"], group.get("names", ()))}
    index = {p: i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    metrics = {}
    for p, projector in optimizer.projectors.items():
        name = names.get(p, f"param{index[p]}")
        metrics[f"optim/layers/{name}/rank"] = float(projector.rank)
        metrics[f"optim/layers/{name}/refreshes"] = float(projector.refreshes)
    return metrics
