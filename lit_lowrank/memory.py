"""Training-memory estimate per method — weights, gradients, optimizer states — from parameter
shapes alone (build the model on the ``meta`` device: no weights are allocated).

A method is a registered :class:`~lit_lowrank.methods.Method` (its storage is derived from its
options by :func:`storage`) or a full-rank baseline (:data:`BASELINES`). The figures follow what
this library stores, tensor by tensor, so the optimizer-state figure of a method equals
:meth:`LowRankOptimizer.state_bytes` after a step (tested):

* target weights (``select_targets``) of shape m×n at rank r (clamped to ``min(m, n)``) on
  GaLore's ``std`` side: low-rank moments of ``k = r·max(m, n)`` elements, a basis of
  ``r·min(m, n)``; E times that for a stack of E experts (E×m×n) — one seeded random basis for
  the whole stack, and a float32 limiter norm per expert under Fira/APOLLO — and a conv kernel as
  its out × (in·k…) matricization; every other parameter gets dense AdamW moments (2 per element);
* float moments and bases are in the parameter's dtype (moments are shaped like the gradient);
  Lion keeps one moment;
* 8-bit moments (``adamw8bit`` inner): ``k + 4⌈k/B⌉ + 16`` bytes each — uint8 codes, a float32
  absmax per block of B (256), the packed shape — when ``k ≥ min_8bit_size`` (4096), else float;
* the INT4 basis of Q-GaLore (``int`` quantizer, asymmetric, group 256): ``⌈n/2⌉`` code bytes
  over whole groups, float32 scale and minimum per group, the packed shape;
* the DCT projector checkpoints its r column indices (int64) and caches the r columns;
* APOLLO's random projection is checkpointed as its seed and shape (m, n) (two int64) but its
  dense basis (``r·min(m, n)`` in the parameter's dtype) stays cached between steps
  (``projector_args: {cache_basis: false}`` drops it and redraws it at every use);
* SNSM (``snsm``): one float32 subset norm per row or column, ``4·max(m, n)``, beside its one
  momentum (``momentum`` inner, like Lion's); subset-norm Adam (``adamw-sn`` inner, ``auto``
  subsets of R) keeps the same: one moment and ``4·max(m, n)``;
* Adafactor (``galore-adafactor``): float32 row and column statistics of the low-rank tensor,
  ``4·(r + max(m, n))``, plus a float32 first moment ``4·k`` with ``beta1`` — float32 whatever
  the parameter's dtype;
* ``adamw8bit`` as a full-rank method is ``bitsandbytes.optim.AdamW8bit``: every tensor of at
  least 4096 elements with uint8 moments and float32 absmax per 256, smaller ones float32.

Weights: every parameter in its dtype; Q-GaLore's target weights as INT8 codes with a float32
scale and minimum per group of 256 (``QuantizedLinear``). Gradients: one per trainable
parameter in its dtype; layer-wise (optimizer step in the backward hook) only the largest one is
alive at a time. Activations, the temporary dequantized/normalized weights and the CUDA context
are not included (they depend on batch, sequence length and checkpointing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from lit_lowrank.optim.factory import DEFAULT_EXCLUDE, DEFAULT_TARGETS, select_targets
from lit_lowrank.optim.layouts import View
from lit_lowrank.optim.targets import GRADNORM_DIRECTION, target_layouts
from lit_lowrank.methods import Method
from lit_lowrank.plugins import get_method
from lit_lowrank.reparam.gradnorm import apply_gradnorm

LAYERWISE = "-layerwise"
BASELINES = ("adamw", "adamw8bit")
"""Full-rank references: ``torch.optim.AdamW`` and ``bitsandbytes.optim.AdamW8bit``."""

MOMENTS = {"adamw": "float", "adamw-hf": "float", "adamw8bit": "8bit", "lion": "single", "momentum": "single",
           "adamw-sn": "subset-norm", "adafactor": "factored"}
"""How each inner optimizer with a known formula stores its moments."""
BASES = {"svd": "float", "rsvd": "float", "svd-warm": "float", "online-pca": "float", "random": "seed",
         "dct": "columns"}
"""How each projector with a known formula stores its basis (before any basis quantizer)."""
RULE_STATES = {"galore": 0, "fira": 0, "apollo": 0, "apollo-mini": 0, "snsm": 4}
LIMITED_RULES = ("fira", "apollo", "apollo-mini")
"""Rules with Fira's norm-growth limiter: one float32 norm per matrix (0-dim, uncounted, for a
weight; E of them for a stack of E experts)."""
"""Float32 bytes each rule keeps per element of the weight's longer side (SNSM's subset norms);
the limiters' scalars are not counted."""


@dataclass(frozen=True)
class Storage:
    """How a method stores its state (see the module docstring for the byte counts), derived
    from its registered options by :func:`storage`.

    Args:
        lowrank: target weights get projected moments (else full-rank Adam on everything).
        moments: ``"float"``, ``"8bit"`` (blockwise, bitsandbytes format), ``"single"`` (one
            moment: Lion), ``"subset-norm"`` (one moment and a float32 value per element of
            max(m, n)), ``"factored"`` or ``"factored-beta1"`` (Adafactor without/with a first moment).
        basis: ``"float"`` (parameter dtype), ``"columns"`` (DCT: r indices and the cached
            columns), ``"seed"`` (random: the seed and shape, plus the cached basis) or
            ``"int<bits>"`` (a quantized basis, Q-GaLore's ``int4``).
        rank: a fixed rank (APOLLO-Mini: 1) instead of the requested one.
        weight_bits: target weights held as integer codes of this many bits (Q-GaLore: 8).
        gradnorm: the model must be weight-normalized (``apply_gradnorm``).
        cache_basis: the projector keeps its regenerable basis between steps.
        rule_state: bytes per element of max(m, n) that the rule keeps (SNSM: 4).
        limiter: the rule keeps a norm-growth limiter's norm per matrix (Fira, APOLLO).
        side: the projected side: ``std`` (the smaller dimension), ``right`` (n, R m×r) or ``left``.
        compact: CompAct's layers: a target's gradient is its R (r·m), never the m×n matrix.
    """

    lowrank: bool = True
    moments: str = "float"
    basis: str = "float"
    rank: int | None = None
    weight_bits: int | None = None
    gradnorm: bool = False
    cache_basis: bool = True
    rule_state: int = 0
    limiter: bool = False
    side: str = "std"
    compact: bool = False


def storage(name: str | Method) -> Storage:
    """The :class:`Storage` of a baseline, a registered method (by name) or a :class:`Method`.

    Raises:
        UnknownComponentError: for an unregistered method (the message lists them).
        ValueError: for a method whose components have no formula here (a plugin's, or an
            adaptive rank that depends on the gradients): measure it with ``state_bytes()``.
    """
    if name in BASELINES:
        return Storage(lowrank=False, moments="8bit" if name == "adamw8bit" else "float")
    method = get_method(name) if isinstance(name, str) else name
    options = method.options
    inner, projector, rule = (options.get("inner", "adamw"), options.get("projector", "svd"),
                              options.get("rule", "galore"))
    if inner not in MOMENTS or projector not in BASES or rule not in RULE_STATES:
        raise ValueError(f"no memory formula for method {name!r} (inner {inner!r}, projector {projector!r}, "
                         f"rule {rule!r}); measure it with LowRankOptimizer.state_bytes() after a step")
    moments = MOMENTS[inner]
    if moments == "subset-norm" and options.get("inner_args", {}).get("subsets", "auto") != "auto":
        raise ValueError(f"no memory formula for method {name!r}: its subsets are not 'auto'; "
                         "measure it with LowRankOptimizer.state_bytes() after a step")
    if moments == "factored" and options.get("inner_args", {}).get("beta1") is not None:
        moments = "factored-beta1"
    if options.get("side", "std") not in ORIENTATIONS:
        raise ValueError(f"no memory formula for method {name!r}: side {options['side']!r}; measure it with "
                         "LowRankOptimizer.state_bytes() after a step")
    projector_args = options.get("projector_args", {})
    basis = BASES[projector]
    if projector_args.get("quantizer") == "int":
        basis = f"int{projector_args.get('quantizer_args', {}).get('bits', 8)}"
    return Storage(moments=moments, basis=basis, rank=options.get("rank"), weight_bits=method.weight_bits,
                   gradnorm=method.gradnorm, cache_basis=projector_args.get("cache_basis", True),
                   rule_state=RULE_STATES[rule], limiter=rule in LIMITED_RULES, side=options.get("side", "std"),
                   compact=method.compact)


@dataclass(frozen=True)
class Formats:
    """Block and group sizes of the quantized formats (the library's defaults)."""

    block_size: int = 256  # 8-bit moments: elements per absmax
    min_8bit_size: int = 4096  # smaller low-rank tensors keep float moments
    basis_group: int = 256
    weight_group: int = 256


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


def method(name: str | Method) -> tuple[Storage, bool]:
    """``(Storage, layerwise)`` for a name such as ``galore-8bit`` or ``q-galore-layerwise``, or a
    :class:`Method` (not layer-wise)."""
    if not isinstance(name, str):
        return storage(name), False
    base = name.removesuffix(LAYERWISE)
    return storage(base), base != name


def estimate(
    model: nn.Module,
    name: str | Method,
    *,
    rank: int,
    targets: Sequence[str] | None = DEFAULT_TARGETS,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    formats: Formats = Formats(),
) -> Estimate:
    """The memory of training ``model`` (real or on the ``meta`` device) with method ``name``.

    Raises:
        UnknownComponentError: for an unregistered method (the message lists them).
        ValueError: for a method without a formula here (see :func:`storage`), or a
            ``gradnorm`` method on a model without ``apply_gradnorm``.
    """
    spec, layerwise = method(name)
    low_rank, dense = select_targets(model, targets, exclude)
    if spec.gradnorm and not any(n.endswith(GRADNORM_DIRECTION) for n in low_rank):
        raise ValueError(f"{name} needs a weight-normalized model: call "
                         "lit_lowrank.reparam.apply_gradnorm(model, targets) first")
    trainable = [*low_rank.values(), *dense.values()]
    weights = sum(_nbytes(p) for p in model.parameters())
    if spec.weight_bits is not None:
        weights += sum(int_bytes(p.numel(), spec.weight_bits, formats.weight_group, p.ndim) - _nbytes(p)
                       for p in low_rank.values())
    grads = [_nbytes(p) for p in trainable]
    if spec.compact:  # a compressed layer's weight gets R (r × its kept dimension), not a gradient
        r = spec.rank or rank
        grads = [_nbytes(p) for p in dense.values()] + [
            min(r, *p.shape) * _oriented(*p.shape, spec.side)[0] * p.element_size() for p in low_rank.values()]
    gradients = max(grads, default=0) if layerwise else sum(grads)
    if not spec.lowrank:
        states = {"moments": 0, "projectors": 0, "dense": sum(_full_rank_states(p, spec, formats) for p in trainable)}
    else:
        r = spec.rank or rank
        views = [(View.of(p, layout), p.element_size()) for p, layout in target_layouts(model, targets, exclude).items()]
        states = {
            "moments": sum(_lowrank_moments(view, r, spec, formats, b) for view, b in views),
            "projectors": sum(_basis(view, r, spec, formats, b) for view, b in views),
            "dense": sum(2 * _nbytes(p) for p in dense.values()),
        }
    return Estimate(weights, gradients, states)


def int_bytes(numel: int, bits: int, group: int, ndim: int) -> int:
    """Bytes of the ``int`` quantizer's packed form: codes over whole groups (``8 // bits`` per
    byte for 2/4/8 bits), float32 scale and minimum per group, int64 shape."""
    groups = math.ceil(numel / group)
    per_byte = 8 // bits if 8 % bits == 0 else 1
    return math.ceil(groups * group / per_byte) + 8 * groups + 8 * ndim


def blockwise8_bytes(numel: int, block: int, ndim: int) -> int:
    """Bytes of one ``bnb-8bit`` packed moment: uint8 codes, float32 absmax per block, shape."""
    return numel + 4 * math.ceil(numel / block) + 8 * ndim


def _nbytes(p: torch.Tensor) -> int:
    return p.numel() * p.element_size()


ORIENTATIONS = ("std", "right", "left")
"""The sides with a formula: R keeps one dimension of G and projects the other."""


def _oriented(m: int, n: int, side: str) -> tuple[int, int]:
    """``(kept, projected)``: the dimension R keeps and the one its basis spans — ``std``
    projects the smaller, ``right`` n (R m×r), ``left`` m (R r×n)."""
    return {"std": (max(m, n), min(m, n)), "right": (m, n), "left": (n, m)}[side]


def _lowrank_moments(view: View, rank: int, spec: Storage, formats: Formats, b: int) -> int:
    kept, projected = _oriented(*view.matrix, spec.side)
    limiter_norms = 4 * view.count if spec.limiter and len(view.shape) == 3 else 0  # per expert, float32
    own = _inner_moments(kept, projected, rank, spec, formats, b) + spec.rule_state * kept
    return view.count * own + limiter_norms


def _inner_moments(kept: int, projected: int, rank: int, spec: Storage, formats: Formats, b: int) -> int:
    r = min(rank, kept, projected)
    k = r * kept
    if spec.moments == "8bit" and k >= formats.min_8bit_size:
        return 2 * blockwise8_bytes(k, formats.block_size, 2)
    if spec.moments.startswith("factored"):  # float32 row and column statistics (+ first moment)
        factored = 4 * (r + kept)
        return factored + (4 * k if spec.moments == "factored-beta1" else 0)
    if spec.moments == "subset-norm":  # one moment + float32 subset norms along the kept axis
        return k * b + 4 * kept
    return (1 if spec.moments == "single" else 2) * k * b


def _basis(view: View, rank: int, spec: Storage, formats: Formats, b: int) -> int:
    kept, projected = _oriented(*view.matrix, spec.side)
    shared = spec.basis == "seed"  # a seeded draw is one basis for the whole stack of experts
    return (1 if shared else view.count) * _matrix_basis(kept, projected, rank, spec, formats, b)


def _matrix_basis(kept: int, projected: int, rank: int, spec: Storage, formats: Formats, b: int) -> int:
    r = min(rank, kept, projected)
    numel = r * projected
    cached = numel * b if spec.cache_basis else 0
    if spec.basis == "seed":  # int64 shape (m, n) + the cached dense basis
        return 8 * 2 + cached
    if spec.basis == "columns":  # r int64 column indices + the cached columns
        return 8 * r + cached
    if spec.basis.startswith("int"):
        return int_bytes(numel, int(spec.basis[3:]), formats.basis_group, 2)
    return numel * b


def _full_rank_states(p: nn.Parameter, spec: Storage, formats: Formats) -> int:
    if spec.moments != "8bit":
        return 2 * _nbytes(p)
    if p.numel() < 4096:  # bitsandbytes keeps float32 moments for small tensors
        return 2 * 4 * p.numel()
    return 2 * (p.numel() + 4 * math.ceil(p.numel() / 256))


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
