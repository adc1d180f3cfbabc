"""``LowRankConfig``: the ``lowrank:`` section of a YAML config, mapped onto
:func:`lit_lowrank.build_optimizer` by registered component names."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lit_lowrank.lightning.lr_schedule import DECAYS
from lit_lowrank.optim.factory import build_optimizer
from lit_lowrank.optim.lowrank import ADAMW_BETAS, ADAMW_EPS
from lit_lowrank.optim.targets import check_patterns
from lit_lowrank.optim.validation import check_group
from lit_lowrank.plugins import get_method
from lit_lowrank.quantizers.quantized_linear import quantize_linear_weights
from lit_lowrank.reparam.gradnorm import apply_gradnorm


@dataclass
class LowRankConfig:
    """Which optimizer to build and its learning-rate schedule.

    Component fields (``projector``, ``rule``, ``inner``, ``schedule``) are *registered names*
    (``python -m lit_lowrank plugins`` lists them), so a projector from a pip-installed plugin
    is usable by writing its name here. ``*_args`` are that component's extra keyword arguments.

    Args:
        method: a registered method (``python -m lit_lowrank plugins`` lists them, e.g. ``fira``,
            ``apollo``, ``q-galore``): its settings fill the method fields (rank, projector,
            side, update_gap, scale, rule, inner, schedule, on_refresh, ``*_args``, gradnorm,
            weight_bits) left at ``null``; a field you set replaces the method's value for it.
        enabled: ``False`` trains every parameter with plain ``torch.optim.AdamW`` (the papers'
            full-rank baseline) through the same module, schedule and telemetry.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``; ``betas``/``eps`` left ``null``
            take the inner optimizer's own defaults (Lion's betas (0.9, 0.99)) and AdamW's
            ((0.9, 0.999), 1e-8) for dense weights and ``enabled: false``.
        targets, exclude: which weights to project (see :func:`lit_lowrank.select_targets`):
            ``targets: null`` (default) the linear layers inside the network's repeated blocks,
            never embeddings or the output head; or a list of module-name patterns; ``exclude``
            patterns remove modules. Everything else gets dense AdamW.
        rank, projector, side, update_gap, scale, rule, inner, schedule, on_refresh,
        projector_args, rule_args, inner_args, schedule_args: :class:`LowRankOptimizer`'s options.
        nonfinite: a step with a NaN/inf gradient is skipped (``skip``, counted in
            ``optim/skipped_steps``), raises (``raise``) or goes through (``ignore``).
        warmup: linear warm-up length, in steps (int ≥ 1) or as a fraction of the run (float < 1).
        min_lr_ratio: the decay ends at ``min_lr_ratio · lr`` (0.1 in the GaLore papers' pretraining).
        lr_schedule: after warm-up, ``cosine`` decay (LLaMA pretraining), ``linear`` decay (the
            papers' GLUE fine-tuning) or ``constant``.
        layerwise: step each weight inside backward and free its gradient at once
            (:class:`~lit_lowrank.lightning.layerwise.LayerwiseCallback`): lower peak memory by
            about the gradients' size; works with ``accumulate_grad_batches`` (low-rank weights
            accumulate their projections), not with ``gradient_clip_val``, fp16 scaling or DDP.
        gradnorm: GradNormLoRP — weight-normalize the target linear weights (``W = g·V/‖V‖``,
            :func:`lit_lowrank.reparam.apply_gradnorm`) in :meth:`prepare`, so the direction V
            is projected and the magnitude g trained densely; ``fold_gradnorm`` undoes it.
        weight_bits, weight_args: Q-GaLore's quantized weights — with ``weight_bits`` (8 in the
            paper) :meth:`prepare` replaces the target linear layers by
            :class:`~lit_lowrank.quantizers.quantized_linear.QuantizedLinear` (weight held as
            group-wise integer codes, updated with stochastic rounding); ``weight_args`` are
            :func:`quantize_linear_weights`'s ``group_size`` (256) and ``stochastic`` (true).
    """

    enabled: bool = True
    method: str | None = None
    lr: float = 0.01
    betas: tuple[float, float] | None = None
    eps: float | None = None
    weight_decay: float = 0.0
    targets: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    rank: int | None = None
    projector: str | None = None
    side: str | None = None
    update_gap: int | None = None
    scale: float | None = None
    rule: str | None = None
    inner: str | None = None
    schedule: str | None = None
    on_refresh: str | None = None
    projector_args: dict[str, Any] | None = None
    rule_args: dict[str, Any] | None = None
    inner_args: dict[str, Any] | None = None
    schedule_args: dict[str, Any] | None = None
    nonfinite: str = "skip"
    warmup: float = 0.1
    min_lr_ratio: float = 0.1
    lr_schedule: str = "cosine"
    layerwise: bool = False
    gradnorm: bool | None = None
    weight_bits: int | None = None
    weight_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._resolve_method()
        check_patterns(targets=self.targets, exclude=self.exclude)
        if self.layerwise and not self.enabled:
            raise ValueError("layerwise: true steps the low-rank optimizer inside backward; set enabled: true "
                             "(plain AdamW has no layer-wise mode here) or layerwise: false")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r}; expected one of {LR_SCHEDULES}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not (0 <= self.warmup < 1 or (1 <= self.warmup < math.inf and self.warmup == int(self.warmup))):
            raise ValueError(f"warmup must be a whole number of steps (>= 1) or a fraction of the run in "
                             f"[0, 1), got {self.warmup}")
        check_group({**vars(self), "lowrank": self.enabled})  # the optimizer's own checks, at parse time
        if self.weight_bits is not None and (not self.enabled or self.gradnorm):
            raise ValueError("weight_bits (quantized weights) needs the low-rank optimizer without gradnorm; "
                             "set enabled: true and gradnorm: false, or weight_bits: null")

    def _resolve_method(self) -> None:
        """Fill every method field left at ``None``: from ``method``'s settings, else the
        built-in default (:data:`METHOD_DEFAULTS`). A field set explicitly is kept."""
        settings = get_method(self.method).settings() if self.method is not None else {}
        for name, default in METHOD_DEFAULTS.items():
            if getattr(self, name) is None:
                value = settings.get(name, default)
                setattr(self, name, copy.deepcopy(value))

    def optimizer_options(self) -> dict[str, Any]:
        """The keyword arguments of :class:`LowRankOptimizer` (everything but targets/schedule)."""
        options = asdict(self)
        for key in ("enabled", "method", "targets", "exclude", "warmup", "min_lr_ratio", "lr_schedule", "gradnorm", "layerwise",
                    "weight_bits", "weight_args"):
            options.pop(key)
        options["betas"] = None if options["betas"] is None else tuple(options["betas"])
        return options

    def prepare(self, model: nn.Module) -> nn.Module:
        """Apply the model transforms the method needs (GradNormLoRP's reparameterization), in
        place, before any strategy wraps the model or an optimizer is built."""
        if self.enabled and self.gradnorm:
            apply_gradnorm(model, self.targets, self.exclude)
        if self.weight_bits is not None:
            quantize_linear_weights(model, self.targets, bits=self.weight_bits, exclude=self.exclude,
                                    **self.weight_args)
        return model

    def build(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer for ``model``: a :class:`LowRankOptimizer`, or AdamW if not ``enabled``."""
        if not self.enabled:
            params = [p for p in model.parameters() if p.requires_grad]
            return torch.optim.AdamW(params, lr=self.lr, betas=tuple(self.betas or ADAMW_BETAS),
                                     eps=ADAMW_EPS if self.eps is None else self.eps, weight_decay=self.weight_decay)
        return build_optimizer(model, targets=self.targets, exclude=self.exclude, **self.optimizer_options())

    def warmup_steps(self, total_steps: int) -> int:
        """``warmup`` in steps for a run of ``total_steps``; a warm-up longer than the run is an
        error (the LR would never reach ``lr``)."""
        steps = int(self.warmup) if self.warmup >= 1 else int(round(self.warmup * total_steps))
        if steps > total_steps:
            raise ValueError(f"warmup of {steps} steps is longer than the run ({total_steps} optimizer steps); "
                             f"set lowrank.warmup to at most {total_steps}, or to a fraction of the run (< 1)")
        return steps


LR_SCHEDULES = DECAYS
METHOD_DEFAULTS: dict[str, Any] = {
    "rank": 128, "projector": "svd", "side": "std", "update_gap": 200, "scale": 0.25, "rule": "galore",
    "inner": "adamw", "schedule": "fixed", "on_refresh": "keep", "projector_args": {}, "rule_args": {},
    "inner_args": {}, "schedule_args": {}, "gradnorm": False, "weight_bits": None,
}
"""The fields a ``method`` may set (``null`` in YAML: the method's value, else this default)."""
