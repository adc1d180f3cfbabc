"""What a strategy or trainer cannot honour for a :class:`LowRankConfig`, refused before training
with the fix in the message: sharding that splits what a mode needs whole, trainer features that
read the gradients a model transform hides, options a :class:`LowRankModule` takes elsewhere."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

from lit_lowrank import transforms as model_transforms
from lit_lowrank.lightning.config import LowRankConfig
from lit_lowrank.lightning.gradient_readers import refuse_gradient_readers
from lit_lowrank.optim.validation import check_shardable


def check_strategy(strategy: pl.strategies.Strategy, config: LowRankConfig) -> None:
    """Refuse what a data-parallel or sharding strategy cannot train: FSDP1 (``FSDPStrategy``
    flattens the weights, so no rank holds whole rows), under DDP the transforms it cannot
    replicate (:func:`check_replicable`), and under ``ModelParallelStrategy`` (FSDP2, rows split
    over the ranks) the options that need whole gradients or weights on every rank."""
    if isinstance(strategy, FSDPStrategy):
        raise ValueError("FSDPStrategy (FSDP1) flattens the weights and cuts them anywhere, so no rank holds whole "
                         "rows of a gradient; use strategy='fsdp_lowrank' (FSDP2's fully_shard through Lightning's "
                         "ModelParallelStrategy), see README 'Scaling out'")
    if isinstance(strategy, DDPStrategy):
        check_replicable(config)
    if not isinstance(strategy, ModelParallelStrategy):
        return
    whole = [t.name for t in model_transforms.build(config.transforms) if t.needs_whole_weights]
    unsharded = {"layerwise": config.layerwise, "communication: lowrank": config.communication == "lowrank",
                 **{name: True for name in whole}}
    refused = [name for name, wanted in unsharded.items() if wanted]
    if refused:
        raise ValueError(f"{refused} cannot be combined with sharded weights ({type(strategy).__name__}): each "
                         "needs whole weights or gradients on every rank; turn them off or use strategy='ddp_lowrank' "
                         "(see README 'Scaling out')")
    check_shardable(vars(config))  # the method's components, before the model is set up


def check_replicable(config: LowRankConfig) -> None:
    """Refuse, under DDP, a transform whose weights DDP cannot broadcast when it wraps the model
    (``int-weights``' handles have no storage): torch would fail inside its constructor with an
    error that names no fix."""
    unreplicable = [t.name for t in model_transforms.build(config.transforms if config.enabled else None)
                    if not t.replicable]
    if unreplicable:
        raise ValueError(f"transform(s) {unreplicable} cannot be trained under DDP: torch's DistributedDataParallel "
                         "broadcasts every weight when it wraps the model, and these weights have no storage of their "
                         "own; train in one process (strategy='lowrank', devices=1), or pick a method without them "
                         "(galore-8bit keeps 8-bit moments beside float weights)")


def check_transform_trainer(trainer: pl.Trainer, config: LowRankConfig) -> None:
    """Refuse what would read the weight gradients a transform hides (CompAct's layers hand the
    optimizer ``R``): norm clipping (it would clip every other gradient by a norm without them)
    and the fp16 scaler (it would not unscale ``R``)."""
    for transform in model_transforms.build(config.transforms if config.enabled else None):
        if transform.hides_gradients:
            refuse_gradient_readers(
                trainer, feature=f"transform {transform.name!r}", off=f"no {transform.name!r} in lowrank.transforms",
                clipping=f"the weights {transform.name!r} transforms have no gradients to clip, and the others would "
                         "be clipped by a norm without them",
                scaling="the optimizer gets projected gradients that the fp16 scaler does not unscale")


def check_module_options(strategy_name: str, explicit: frozenset[str]) -> None:
    """Refuse options set on a ``lowrank`` strategy that trains a :class:`LowRankModule`, which
    builds its optimizer from its own ``lowrank`` section (``explicit``: the options set)."""
    if explicit:
        raise ValueError(f"{sorted(explicit)} set on strategy={strategy_name!r}, but LowRankModule "
                         "takes its optimizer from its own lowrank section: set them there")
