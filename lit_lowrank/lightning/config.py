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
from lit_lowrank.optim.communication import COMMUNICATIONS
from lit_lowrank.optim.factory import build_optimizer
from lit_lowrank.optim.guard import MAX_CONSECUTIVE_SKIPS
from lit_lowrank.optim.lowrank import ADAMW_BETAS, ADAMW_EPS
from lit_lowrank.targets import check_patterns
from lit_lowrank.optim.validation import check_group
from lit_lowrank import transforms as model_transforms
from lit_lowrank.methods import LEGACY_TRANSFORMS, OPTION_KEYS, TRANSFORMS_KEY
from lit_lowrank.options import names
from lit_lowrank.optim.resolution import resolve


@dataclass
class LowRankConfig:
    """Which optimizer to build and its learning-rate schedule.

    Component fields (``projector``, ``rule``, ``inner``, ``schedule``) are *registered names*
    (``python -m lit_lowrank plugins`` lists them), so a projector from a pip-installed plugin
    is usable by writing its name here. ``*_args`` are that component's extra keyword arguments.

    A method field left ``null`` takes the ``method``'s value, else the default named in its help.

    Args:
        enabled: False trains every parameter with plain torch.optim.AdamW (the papers' full-rank
            baseline) through the same module, schedule and telemetry.
        method: A registered method (fira, apollo, q-galore, ...; `python -m lit_lowrank plugins`
            lists them): its settings fill the method fields left null; a field you set replaces
            the method's value for it.
        lr: Peak learning rate (as torch.optim.AdamW).
        betas: Adam's (β1, β2); null: the inner optimizer's own (Lion (0.9, 0.99)), AdamW's
            (0.9, 0.999) for dense weights.
        eps: Adam's ε; null: the inner optimizer's own (HF AdamW 1e-6), else 1e-8.
        weight_decay: Decoupled weight decay λ (as torch.optim.AdamW).
        targets: Which weights to project: null, the linear layers inside the network's repeated
            blocks (never embeddings or the output head); or a list of module-name regexes.
            Everything else gets dense AdamW.
        exclude: Module-name regexes removed from the targets.
        rank: Subspace rank r, clamped to min(m, n) with a warning (method field; default 128).
        projector: Registered projector: how the subspace is found (method field; default svd).
        side: Which side to project: std, reverse_std, left, right or full (method field;
            default std: the smaller dimension).
        update_gap: Steps between subspace refreshes, T (method field; default 200).
        scale: The update scale α (method field; default 0.25).
        rule: Registered update rule: how the low-rank step becomes a full-rank one (method field;
            default galore).
        inner: Registered inner optimizer: the moments in low-rank space (method field; default
            adamw).
        schedule: Registered refresh schedule (method field; default fixed: every update_gap steps).
        on_refresh: The moments when a subspace changes: keep, reset or rotate (method field;
            default keep).
        projector_args: The projector's own options, e.g. {oversample: 8} (method field).
        rule_args: The rule's own options, e.g. {gamma: 1.01} (method field).
        inner_args: The inner optimizer's own options, e.g. {min_8bit_size: 4096} (method field).
        schedule_args: The schedule's own options, e.g. {threshold: 0.4} (method field).
        nonfinite: A step with a NaN/inf gradient is skipped (skip, counted in
            optim/skipped_steps), raises (raise) or goes through (ignore). A NaN/inf weight raises.
        max_consecutive_skips: With nonfinite skip, the most updates of one weight skipped in a
            row; the next raises (the run stops instead of finishing untrained). null: no bound.
        refresh_sharing: Under data parallelism, each weight's subspace refresh computed by one
            rank and its bases broadcast (the same weights, bitwise): auto (ddp_lowrank,
            fsdp_lowrank), on (plain DDP) or off.
        projector_seed: Which draws the random projections (random, rsvd's sketch) make: 0 keeps
            the default draws, another integer gives the run other projections (one per run
            seed, say); a checkpoint resumes only with its own value.
        warmup: Linear warm-up length: steps (an integer ≥ 1) or a fraction of the run (< 1).
        min_lr_ratio: The decay ends at min_lr_ratio · lr (0.1 in the GaLore papers' pretraining).
        lr_schedule: After warm-up: cosine decay (LLaMA pretraining), linear decay (the papers'
            GLUE fine-tuning) or constant.
        layerwise: Step each weight inside backward and free its gradient at once (lower peak
            memory by about the gradients' size); works with accumulate_grad_batches and
            strategy ddp_lowrank, not with gradient_clip_val or fp16 scaling.
        communication: What DDP all-reduces for target weights: full (their gradients, as plain
            DDP) or lowrank (R = PᵀG between subspace refreshes: r·max(m, n) numbers instead of
            m·n; the same weights); needs a DDP strategy, refuses gradient_clip_val and fp16.
        transforms: Model transforms applied to the targets before the optimizer is built, as
            {name: options} (method field; `python -m lit_lowrank plugins` lists them):
            int-weights (Q-GaLore: {bits: 8, group_size: 256, stochastic: true}, integer-coded
            weights updated with stochastic rounding), weight-norm (GradNormLoRP: W = g·V/‖V‖,
            V projected, g dense), compact (CompAct: layers save x·Q instead of x and hand the
            optimizer R = G·Q; needs projector random, side right, rule galore, single process,
            not layerwise).
        gradnorm: Deprecated: transforms: {weight-norm: {}}.
        weight_bits: Deprecated: transforms: {int-weights: {bits: <weight_bits>}}.
        weight_args: Deprecated: the int-weights options besides bits.
        compact: Deprecated: transforms: {compact: {}}.
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
    max_consecutive_skips: int | None = MAX_CONSECUTIVE_SKIPS
    refresh_sharing: str = "auto"
    projector_seed: int = 0
    warmup: float = 0.1
    min_lr_ratio: float = 0.1
    lr_schedule: str = "cosine"
    layerwise: bool = False
    communication: str = "full"
    transforms: dict[str, dict[str, Any]] | None = None
    gradnorm: bool | None = None
    weight_bits: int | None = None
    weight_args: dict[str, Any] | None = None
    compact: bool | None = None

    def __post_init__(self) -> None:
        self._resolve_method()
        check_patterns(targets=self.targets, exclude=self.exclude)
        if self.layerwise and not self.enabled:
            raise ValueError("layerwise: true steps the low-rank optimizer inside backward; set enabled: true "
                             "(plain AdamW has no layer-wise mode here) or layerwise: false")
        if self.communication not in COMMUNICATIONS:
            raise ValueError(f"communication={self.communication!r}; expected one of {COMMUNICATIONS}")
        if self.communication == "lowrank" and not self.enabled:
            raise ValueError("communication: lowrank all-reduces projected gradients of the low-rank optimizer; set "
                             "enabled: true or communication: full")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r}; expected one of {LR_SCHEDULES}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not (0 <= self.warmup < 1 or (1 <= self.warmup < math.inf and self.warmup == int(self.warmup))):
            raise ValueError(f"warmup must be a whole number of steps (>= 1) or a fraction of the run in "
                             f"[0, 1), got {self.warmup}")
        check_group({**vars(self), "lowrank": self.enabled})  # the optimizer's own checks, at parse time
        self._check_transforms()

    def _check_transforms(self) -> None:
        """Refuse, at parse time, transforms the run cannot train: unknown names or options, any
        without the low-rank optimizer, one hiding gradients (CompAct) with layer-wise mode or
        low-rank communication, optimizer options a transform cannot step with."""
        built = model_transforms.build(self.transforms)
        if built and not self.enabled:
            raise ValueError(f"transforms {list(self.transforms)} are trained by the low-rank optimizer; set "
                             "enabled: true, or transforms: null")
        for transform in built:
            if transform.hides_gradients and (self.layerwise or self.communication != "full"):
                raise ValueError(f"transform {transform.name!r} delivers its updates to optimizer.step() without "
                                 "weight gradients, which layer-wise mode and low-rank communication work from; set "
                                 "layerwise: false and communication: full")
            transform.check_options(vars(self))

    def _resolve_method(self) -> None:
        """Fill every method field left at ``None`` through the run's one resolution
        (:func:`~lit_lowrank.optim.resolution.resolve`): from ``method``'s settings, else the
        schema's default. A field set explicitly is kept, unless it contradicts what the method
        is (refused). The deprecated transform fields are folded into ``transforms`` (with a
        DeprecationWarning) and cleared."""
        aliases = {name: getattr(self, name) for name in LEGACY_TRANSFORMS if getattr(self, name) is not None}
        run = resolve(self.method, {**{name: getattr(self, name) for name in METHOD_FIELDS}, **aliases})
        for name in OPTION_KEYS:
            setattr(self, name, copy.deepcopy(run.options[name]))
        self.transforms = copy.deepcopy(run.transforms) or None
        for name in LEGACY_TRANSFORMS:
            setattr(self, name, None)

    def optimizer_options(self) -> dict[str, Any]:
        """The keyword arguments of :class:`LowRankOptimizer` (every option of the schema)."""
        options = {name: copy.deepcopy(getattr(self, name)) for name in names()}
        options["betas"] = None if options["betas"] is None else tuple(options["betas"])
        return options

    def prepare(self, model: nn.Module) -> nn.Module:
        """Apply the model transforms of the run (:func:`lit_lowrank.transforms.prepare`), in
        place, before any strategy wraps the model or an optimizer is built."""
        if self.enabled:
            model_transforms.prepare(model, self.transforms, self.targets, self.exclude)
        return model

    def build(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer for ``model``: a :class:`LowRankOptimizer`, or AdamW if not ``enabled``."""
        if not self.enabled:
            params = [p for p in model.parameters() if p.requires_grad]
            return torch.optim.AdamW(params, lr=self.lr, betas=tuple(self.betas or ADAMW_BETAS),
                                     eps=ADAMW_EPS if self.eps is None else self.eps, weight_decay=self.weight_decay)
        optimizer = build_optimizer(model, targets=self.targets, exclude=self.exclude, transforms=self.transforms,
                                    **self.optimizer_options())
        model_transforms.bind(model, self.transforms, optimizer)
        return optimizer

    def warmup_steps(self, total_steps: int) -> int:
        """``warmup`` in steps for a run of ``total_steps``; a warm-up longer than the run is an
        error (the LR would never reach ``lr``)."""
        steps = int(self.warmup) if self.warmup >= 1 else int(round(self.warmup * total_steps))
        if steps > total_steps:
            raise ValueError(f"warmup of {steps} steps is longer than the run ({total_steps} optimizer steps); "
                             f"set lowrank.warmup to at most {total_steps}, or to a fraction of the run (< 1)")
        return steps


LR_SCHEDULES = DECAYS
METHOD_FIELDS = (*OPTION_KEYS, TRANSFORMS_KEY)
"""The fields a ``method`` may set (``null`` in YAML: the method's value, else the default)."""
