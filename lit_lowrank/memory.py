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

Weights: every parameter in its dtype; Q-GaLore's target weights as INT8 codes with a float32
scale and minimum per group of 256 (``QuantizedLinear``). Gradients: one per trainable
parameter in its dtype; CompAct's targets hand the optimizer their ``R`` instead; layer-wise
(optimizer step in the backward hook) only the largest one is alive at a time. Activations, the
temporary dequantized/normalized weights and the CUDA context are not included (they depend on
batch, sequence length and checkpointing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from lit_lowrank.optim.factory import DEFAULT_EXCLUDE, DEFAULT_TARGETS, build_optimizer, select_targets
from lit_lowrank.optim.summary import LowRankSummary, summarize
from lit_lowrank import transforms as model_transforms
from lit_lowrank.methods import Method
from lit_lowrank.plugins import get_method
from lit_lowrank.transforms.weight_norm import apply_gradnorm

LAYERWISE = "-layerwise"
BASELINES = ("adamw", "adamw8bit")
"""Full-rank references: ``torch.optim.AdamW`` and ``bitsandbytes.optim.AdamW8bit``."""


@dataclass(frozen=True)
class Formats:
    """Block and group sizes of the formats the estimator counts itself (the library's and
    bitsandbytes' defaults); the optimizer's own formats come from its components."""

    block_size: int = 256  # bitsandbytes AdamW8bit: elements per absmax
    min_8bit_size: int = 4096  # bitsandbytes AdamW8bit: smaller tensors keep float32 moments
    weight_group: int = 256  # Q-GaLore's INT8 weights: values per scale and minimum


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
            docstring), or a ``weight-norm`` method on a model without it (its parameters differ;
            the other transforms are counted here, on the plain model).
    """
    recipe, layerwise = method(name)
    low_rank, dense = select_targets(model, targets, exclude)
    weights = sum(_nbytes(p) for p in model.parameters())
    trainable = [*low_rank.values(), *dense.values()]
    if recipe is None:
        grads = [_nbytes(p) for p in trainable]
        states = {"moments": 0, "projectors": 0, "dense": sum(_full_rank_states(p, name, formats) for p in trainable)}
        return Estimate(weights, max(grads, default=0) if layerwise else sum(grads), states)
    transforms = model_transforms.build(recipe.transforms)
    model_transforms.check(model, {t.name: t.options for t in transforms if t.name == "weight-norm"}, repr(name))
    bits = recipe.transforms.get("int-weights", {}).get("bits")
    if bits is not None:  # INT8 codes instead of the target weights
        weights += sum(int_bytes(p.numel(), bits, formats.weight_group, p.ndim) - _nbytes(p)
                       for p in low_rank.values())
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


def int_bytes(numel: int, bits: int, group: int, ndim: int) -> int:
    """Bytes of the ``int`` quantizer's packed form: codes over whole groups (``8 // bits`` per
    byte for 2/4/8 bits), float32 scale and minimum per group, int64 shape."""
    groups = math.ceil(numel / group)
    per_byte = 8 // bits if 8 % bits == 0 else 1
    return math.ceil(groups * group / per_byte) + 8 * groups + 8 * ndim


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


def llama_on_meta(size: str, *, dtype: torch.dtype = torch.bfloat16, gradnorm: bool = False,
                  targets: Sequence[str] | None = DEFAULT_TARGETS) -> nn.Module:
    """``LlamaForCausalLM`` of a named size (:data:`lit_lowrank.models.llama.LLAMA_SIZES`) on the meta device, in ``dtype``;
    weight-normalized when ``gradnorm``."""
    from transformers import LlamaForCausalLM

    from lit_lowrank.models.llama import llama_config

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(size)).to(dtype)
    return apply_gradnorm(model, targets) if gradnorm else model


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
