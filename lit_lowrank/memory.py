"""Training-memory estimate per method — weights, gradients, optimizer states — from parameter
shapes alone (build the model on the ``meta`` device: no weights are allocated).

A method is a registered :class:`~lit_lowrank.methods.Method` — a built-in or a plugin's — or a
full-rank baseline (:data:`BASELINES`). The optimizer state is not looked up by name: the
method's optimizer is built over the model and its components predict their own tensors on the
``meta`` device, as the fit-start summary does (:func:`lit_lowrank.optim.summary.summarize`:
``inner.init_state(R)``, the rule's ``state_layout``, ``projector.resident_bytes()``, the dense
groups' moments) — so the figure equals :meth:`LowRankOptimizer.state_bytes` after a step
(tested) for any registered component, 8-bit moments and quantized bases included. A method
whose components need real values (``adaptive-rank``: a rank chosen from the spectrum) has no
estimate. ``adamw8bit`` as a full-rank baseline is ``bitsandbytes.optim.AdamW8bit``: every
tensor of at least 4096 elements with uint8 moments and a float32 absmax per 256, smaller ones
float32.

Weights: every parameter in its dtype; the target weights as the method's model transforms
store them (:meth:`Transform.weight_bytes <lit_lowrank.transforms.Transform.weight_bytes>`:
Q-GaLore's INT8 codes with a float32 scale and minimum per group). A transform that changes the
parameters themselves (:attr:`~lit_lowrank.transforms.Transform.estimated_applied`:
GradNormLoRP's ``g`` and ``V``) is estimated on a model holding it (:func:`estimate_model`
prepares one). Gradients: one per trainable parameter in its dtype; a transform that hides the
targets' gradients (CompAct's) hands the optimizer their ``R`` instead; layer-wise
(optimizer step in the backward hook) only the largest one is alive at a time. Activations, the
temporary dequantized/normalized weights and the CUDA context are not included (they depend on
batch, sequence length and checkpointing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from lit_lowrank.optim.factory import DEFAULT_EXCLUDE, DEFAULT_TARGETS, build_optimizer, select_targets
from lit_lowrank.optim.summary import LowRankSummary, summarize
from lit_lowrank import transforms as model_transforms
from lit_lowrank.methods import Method
from lit_lowrank.plugins import get_method

LAYERWISE = "-layerwise"
BASELINES = ("adamw", "adamw8bit")
"""Full-rank references: ``torch.optim.AdamW`` and ``bitsandbytes.optim.AdamW8bit``."""


@dataclass(frozen=True)
class Formats:
    """Block sizes of the full-rank ``adamw8bit`` baseline (bitsandbytes' defaults), which the
    estimator counts itself; the optimizer's and the transforms' formats come from their components."""

    block_size: int = 256  # bitsandbytes AdamW8bit: elements per absmax
    min_8bit_size: int = 4096  # bitsandbytes AdamW8bit: smaller tensors keep float32 moments


@dataclass
class Estimate:
    """Bytes by role; ``states`` splits like :meth:`LowRankOptimizer.state_bytes`."""

    weights: int
    gradients: int
    states: dict[str, int] = field(default_factory=dict)

    @property
    def optimizer(self) -> int:
        return sum(self.states.values())

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer


def method(name: str | Method) -> tuple[Method | None, bool]:
    """``(recipe, layerwise)`` for a name such as ``galore-8bit`` or ``q-galore-layerwise`` (the
    recipe None for a full-rank baseline), or a :class:`Method` (not layer-wise).

    Raises:
        UnknownComponentError: for an unregistered method (the message lists them).
    """
    if not isinstance(name, str):
        return name, False
    base = name.removesuffix(LAYERWISE)
    return (None if base in BASELINES else get_method(base)), base != name


def estimate(
    model: nn.Module,
    name: str | Method,
    *,
    rank: int,
    targets: Sequence[str] | None = DEFAULT_TARGETS,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    formats: Formats = Formats(),
) -> Estimate:
    """The memory of training ``model`` (real or on the ``meta`` device) with method ``name`` at
    ``rank`` (unless the method fixes its own, APOLLO-Mini's 1).

    Raises:
        UnknownComponentError: for an unregistered method (the message lists them).
        ValueError: for a method whose state cannot be predicted on ``meta`` (see the module
            docstring), or a model lacking a transform of the method that is estimated applied
            (:func:`applied_for_estimate`; the others are counted here, on the plain model).
    """
    recipe, layerwise = method(name)
    low_rank, dense = select_targets(model, targets, exclude)
    weights = sum(_nbytes(p) for p in model.parameters())
    trainable = [*low_rank.values(), *dense.values()]
    if recipe is None:
        grads = [_nbytes(p) for p in trainable]
        states = {"moments": 0, "projectors": 0, "dense": sum(_full_rank_states(p, name, formats) for p in trainable)}
        return Estimate(weights, max(grads, default=0) if layerwise else sum(grads), states)
    model_transforms.check(model, applied_for_estimate(recipe), repr(name))
    transforms = model_transforms.build(recipe.transforms)
    weights += sum(t.weight_bytes(p) - _nbytes(p) for t in transforms for p in low_rank.values())
    summary = predicted(model, recipe, name, rank=rank, targets=targets, exclude=exclude)
    if any(t.hides_gradients for t in transforms):  # a compressed layer's weight gets its R, not a gradient
        grads = [_nbytes(p) for p in dense.values()] + [row.predicted.low for row in summary.rows if row.reason is None]
    else:
        grads = [_nbytes(p) for p in trainable]
    return Estimate(weights, max(grads, default=0) if layerwise else sum(grads), summary.states)


def predicted(model: nn.Module, recipe: Method, name: object, *, rank: int, targets: Sequence[str] | None,
              exclude: Sequence[str]) -> LowRankSummary:
    """The summary of ``recipe``'s optimizer over ``model``, its state predicted (the model's
    transforms are counted by :func:`estimate`: the optimizer is built without them).

    Raises:
        ValueError: where a weight's state cannot be predicted, naming it and why.
    """
    optimizer_only = Method(recipe.description, recipe.options)
    fixed = "rank" in recipe.options
    optimizer = build_optimizer(model, method=optimizer_only, targets=targets, exclude=exclude,
                                **({} if fixed else {"rank": rank}))
    summary = summarize(model, optimizer, targets, exclude)
    if summary.states is None:
        row = next(row for row in summary.rows if row.reason is None and row.predicted is None)
        raise ValueError(f"no memory estimate for method {name!r}: the state of {row.name} cannot be predicted on the "
                         f"meta device ({row.unknown}); measure it with LowRankOptimizer.state_bytes() after a step")
    return summary


def applied_for_estimate(recipe: Method | None) -> dict[str, dict[str, Any]]:
    """The transforms of ``recipe`` (``{name: options}``) that a model must hold to be estimated
    (:attr:`~lit_lowrank.transforms.Transform.estimated_applied`); empty for a baseline (None)."""
    built = model_transforms.build(recipe.transforms if recipe is not None else {})
    return {t.name: t.options for t in built if t.estimated_applied}


def _nbytes(p: torch.Tensor) -> int:
    return p.numel() * p.element_size()


def _full_rank_states(p: nn.Parameter, name: object, formats: Formats) -> int:
    """A full-rank baseline's two moments: torch AdamW's in the parameter's dtype, or
    bitsandbytes AdamW8bit's (uint8 codes and a float32 absmax per block from ``min_8bit_size``
    elements on, float32 below)."""
    if name != "adamw8bit":
        return 2 * _nbytes(p)
    if p.numel() < formats.min_8bit_size:
        return 2 * 4 * p.numel()
    return 2 * (p.numel() + 4 * math.ceil(p.numel() / formats.block_size))


def llama_on_meta(size: str, *, dtype: torch.dtype = torch.bfloat16,
                  transforms: model_transforms.Transforms | None = None,
                  targets: Sequence[str] | None = DEFAULT_TARGETS) -> nn.Module:
    """``LlamaForCausalLM`` of a named size (:data:`lit_lowrank.models.llama.LLAMA_SIZES`) on the meta device, in ``dtype``,
    holding ``transforms`` (``{name: options}``, applied to ``targets``)."""
    from transformers import LlamaForCausalLM

    from lit_lowrank.models.llama import llama_config

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(size)).to(dtype)
    return model_transforms.prepare(model, transforms, targets)


def estimate_model(size: str, name: str | Method, *, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The meta-device LLaMA of ``size`` that :func:`estimate` takes for method ``name``: holding
    the method's transforms that are estimated applied (:func:`applied_for_estimate`)."""
    return llama_on_meta(size, dtype=dtype, transforms=applied_for_estimate(method(name)[0]))


def measured_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes an optimizer holds now: :meth:`LowRankOptimizer.state_bytes` for ours; for any
    other (torch's, a peer package's), every non-scalar tensor reachable from its state, each
    counted once (peer projector objects kept in the state included)."""
    from lit_lowrank.optim.lowrank import LowRankOptimizer

    if isinstance(optimizer, LowRankOptimizer):
        return sum(optimizer.state_bytes().values())
    seen: set[int] = set()

    def walk(value: object) -> int:
        if isinstance(value, torch.Tensor):
            if value.ndim == 0 or id(value) in seen:
                return 0
            seen.add(id(value))
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(walk(v) for v in value)
        if hasattr(value, "__dict__"):
            return sum(walk(v) for v in vars(value).values())
        return 0

    return sum(walk(state) for state in optimizer.state.values())
