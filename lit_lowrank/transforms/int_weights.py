"""The ``int-weights`` transform: linear layers whose weight lives quantized between steps
(Q-GaLore §3.4: INT8 weights with stochastic-rounding updates).

:class:`QuantizedLinear` keeps its weight as group-wise integer codes (the ``int`` quantizer:
INT8, group 256, per-group scale and offset). The forward pass dequantizes it; the backward
pass produces the usual m×n float weight gradient on a parameter ``weight`` that has the
weight's shape but no storage of its own (a stride-0 view of one element), so the optimizer
sees an ordinary parameter with an ordinary ``.grad``. That parameter's
:func:`~lit_lowrank.transforms.base.stored_weight` is this layer, and :class:`~lit_lowrank.LowRankOptimizer` updates a float copy
``W = float_weight()`` and hands it back through ``store_(W)``, which re-quantizes it with
stochastic rounding, ``w_q ← SR((W − min) / s)``: an update far below one quantization step
survives in expectation instead of being rounded away.

Unlike q-galore-torch's ``float_grad`` attribute on a uint8 parameter, the gradient goes through
autograd's own accumulation (gradient accumulation, hooks and layer-wise mode work unchanged),
and a layer without a gradient is simply skipped by the optimizer.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.targets import linear_targets, replace_module
from lit_lowrank.quantizers.base import Packed
from lit_lowrank.quantizers.int import MAX_BITS, MIN_BITS, IntQuantizer
from lit_lowrank.transforms.base import Transform, attach_store

_PREFIX = "weight_"  # buffers: weight_codes, weight_scales, weight_mins, weight_shape
WEIGHT_ARGS = ("group_size", "stochastic")
"""The options of ``int-weights`` besides their width ``bits``."""
GROUP_SIZE = 256
"""Weight values sharing a scale and minimum unless ``group_size`` says otherwise (Q-GaLore's)."""


class _DequantizedLinear(torch.autograd.Function):
    """``y = x Ŵᵀ`` with ``Ŵ`` dequantized from ``layer`` in the forward and again in the
    backward (no float weight is kept alive between them); ``∂L/∂W = Σ_batch gᵀ x``."""

    @staticmethod
    def forward(ctx, x: Tensor, handle: Tensor, layer: QuantizedLinear) -> Tensor:
        if torch.is_autocast_enabled(x.device.type):  # run in the autocast dtype, as F.linear would
            x = x.to(torch.get_autocast_dtype(x.device.type))
        ctx.layer = layer
        ctx.save_for_backward(x)
        return x @ layer.dequantized(x.dtype).T

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        (x,) = ctx.saved_tensors
        grad_out = grad_out.to(x.dtype)
        grad_x = grad_out @ ctx.layer.dequantized(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        return grad_x, grad_w, None


def rounding_generator(seed: int, update: int, device: torch.device) -> torch.Generator | np.random.Generator:
    """The generator of the stochastic-rounding noise of update ``update`` of layer ``seed``,
    distinct for every pair (both in ``[0, 2³²)``).

    On CUDA, torch's Philox generator keeps the whole 64-bit seed ``seed · 2³² + update``;
    torch's CPU generator keeps only its low 32 bits (every layer would draw the same noise),
    so elsewhere NumPy's PCG64 seeded by ``SeedSequence([seed, update])`` draws it on the CPU,
    as the random projector does (``projectors/sketch.py``).
    """
    if not (0 <= seed < 2**32 and 0 <= update < 2**32):
        raise ValueError(f"rounding seed and update count must be in [0, 2**32), got {seed}, {update}")
    device = torch.device(device)
    if device.type == "cuda":
        return torch.Generator(device=device).manual_seed(seed * 2**32 + update)
    return np.random.default_rng([seed, update])


class QuantizedLinear(nn.Module):
    """``y = x Ŵᵀ + b`` with ``Ŵ`` stored as ``bits``-bit group-wise codes.

    Args:
        in_features, out_features, bias: as :class:`torch.nn.Linear`.
        bits: code width (8 in Q-GaLore; 2–8 accepted, packed densely for 2 and 4).
        group_size: consecutive weight entries sharing a scale (256 in Q-GaLore).
        stochastic: re-quantize updated weights with stochastic rounding (True, Q-GaLore) or
            nearest rounding (updates below half a step are then lost).
        seed: seeds the rounding noise (``quantize_linear_weights`` passes the layer's index);
            the k-th update draws from :func:`rounding_generator` ``(seed, k)``, so distinct
            layers and updates draw distinct noise and a resumed run rounds exactly like an
            uninterrupted one.

    The state dict holds the packed codes, scales and offsets and ``(seed, updates)``; it has no
    float weight. ``weight`` is the zero-storage gradient carrier described in the module doc.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 8, group_size: int = GROUP_SIZE,
        stochastic: bool = True, seed: int = 0, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.stochastic, self.seed, self.updates = stochastic, seed, 0
        self.initial = IntQuantizer(bits=bits, group_size=group_size, rounding="nearest")
        self.rounding = IntQuantizer(bits=bits, group_size=group_size,
                                     rounding="stochastic" if stochastic else "nearest")
        dtype = dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(self._handle(torch.zeros((), device=device, dtype=dtype)))
        attach_store(self.weight, self)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self._packed_keys: tuple[str, ...] = ()
        self._set_packed(self.initial.quantize(torch.zeros(out_features, in_features, device=device)))

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options: Any) -> QuantizedLinear:
        """A quantized copy of ``linear``'s weight (nearest rounding of its current value),
        holding ``linear``'s own bias parameter (a bias tied to another module stays tied)."""
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, False, device=weight.device, dtype=weight.dtype,
                    **options)
        layer._set_packed(layer.initial.quantize(weight))
        layer.bias = linear.bias
        return layer

    def forward(self, x: Tensor) -> Tensor:
        out = _DequantizedLinear.apply(x, self.weight, self)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    # ------------------------------------------------------------------ weight store
    def packed(self) -> Packed:
        return {key: getattr(self, _PREFIX + key) for key in self._packed_keys}

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight Ŵ (out×in) the codes encode."""
        return self.initial.dequantize(self.packed()).to(dtype)

    def float_weight(self) -> Tensor:
        """A fresh float copy of Ŵ in the parameter's dtype, for the optimizer to update."""
        return self.dequantized(self.weight.dtype)

    @torch.no_grad()
    def store_(self, weight: Tensor) -> None:
        """Re-quantize the updated ``weight`` (out×in): fresh per-group scales, then rounding."""
        generator = rounding_generator(self.seed, self.updates, weight.device)
        self._set_packed(self.rounding.quantize(weight, generator=generator))
        self.updates += 1

    def _set_packed(self, packed: Packed) -> None:
        if not self._packed_keys:
            self._packed_keys = tuple(packed)
            for key, tensor in packed.items():
                self.register_buffer(_PREFIX + key, tensor)
            return
        for key, tensor in packed.items():  # same shapes every time: copy, keep buffer identity
            getattr(self, _PREFIX + key).copy_(tensor)

    def _handle(self, scalar: Tensor) -> Tensor:
        return scalar.expand(self.out_features, self.in_features)

    # ------------------------------------------------------------------ module plumbing
    def _apply(self, fn, recurse: bool = True):
        """Device moves reach the codes; dtype casts reach only the bias and the gradient
        carrier (the codes and float32 scales keep their precision)."""
        hidden = {key: self._buffers[_PREFIX + key] for key in self._packed_keys}
        handle = self._parameters["weight"]
        for key in hidden:
            self._buffers[_PREFIX + key] = None
        self._parameters["weight"] = None
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = handle
            probe = fn(torch.zeros((), dtype=handle.dtype, device=handle.device))
            handle.data = self._handle(probe.detach())
            for key, tensor in hidden.items():
                self._buffers[_PREFIX + key] = tensor.to(probe.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        handle, self._parameters["weight"] = self._parameters["weight"], None  # no float weight saved
        try:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            self._parameters["weight"] = handle

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        handle, self._parameters["weight"] = self._parameters["weight"], None
        try:
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        finally:
            self._parameters["weight"] = handle

    def get_extra_state(self) -> Tensor:
        return torch.tensor([self.seed, self.updates], dtype=torch.int64)

    def set_extra_state(self, state: Tensor) -> None:
        self.seed, self.updates = (int(v) for v in state.tolist())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.initial.bits}, group_size={self.initial.group_size}, stochastic={self.stochastic}")


def quantize_linear_weights(
    model: nn.Module, targets: Sequence[str] | None = None, bits: int = 8, group_size: int = GROUP_SIZE,
    stochastic: bool = True, exclude: Sequence[str] = (),
) -> list[str]:
    """Replace, in place, the target layers of :func:`lit_lowrank.select_targets` (same
    ``targets`` and ``exclude``) by :class:`QuantizedLinear`\\ s; they must all be ``nn.Linear``.

    Use the same ``targets`` as the optimizer's low-rank targets: the quantized weights must be
    updated by the low-rank optimizer, which re-quantizes them. A layer registered under several
    names is replaced under all of them by one layer. Returns the replaced names.

    Raises:
        ValueError: if there is no target (the run would silently keep float weights), a target
            is not an ``nn.Linear`` (it would silently stay float), a target's weight is tied to
            another module's (quantizing one would untie them), or an option is out of range
            (:func:`check_weight_options`).
    """
    check_weight_options(bits, {"group_size": group_size, "stochastic": stochastic})
    chosen = linear_targets(model, targets, exclude, "int-weights quantizes")
    for seed, (name, linear) in enumerate(chosen.items()):
        replace_module(model, name, QuantizedLinear.from_linear(
            linear, bits=bits, group_size=group_size, stochastic=stochastic, seed=seed))
    return list(chosen)


def check_weight_options(bits: int, args: dict[str, Any]) -> None:
    """Refuse ``int-weights`` options before any model is transformed, naming the valid values:
    ``bits`` not an integer in 2..8, ``args`` with keys other than :data:`WEIGHT_ARGS`, a
    ``group_size`` neither a positive integer nor -1, a ``stochastic`` not a bool.

    Raises:
        ValueError: naming the option and its valid values.
    """
    if not _is_integer(bits) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"int-weights bits must be an integer in {MIN_BITS}..{MAX_BITS} (8 in Q-GaLore), got {bits!r}")
    unknown = sorted(set(args) - set(WEIGHT_ARGS))
    if unknown:
        raise ValueError(f"int-weights has no option(s) {unknown}; its options are {['bits', *WEIGHT_ARGS]}")
    group_size = args.get("group_size", -1)  # absent: quantize_linear_weights's default, valid
    if not (_is_integer(group_size) and (group_size >= 1 or group_size == -1)):
        raise ValueError(f"int-weights group_size must be a positive integer (256 in Q-GaLore) or -1 (one group "
                         f"per output row), got {group_size!r}")
    if "stochastic" in args and not isinstance(args["stochastic"], bool):
        raise ValueError(f"int-weights stochastic must be true (stochastic rounding, Q-GaLore) or false (nearest), "
                         f"got {args['stochastic']!r}")


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def dequantize_linear_weights(model: nn.Module) -> nn.Module:
    """Replace, in place, every :class:`QuantizedLinear` of ``model`` by an ``nn.Linear`` holding
    its dequantized weight Ŵ (and the layer's own bias parameter); returns ``model``."""
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    for name, layer in quantized.items():
        linear = nn.Linear(layer.in_features, layer.out_features, bias=False, device=layer.weight.device,
                           dtype=layer.weight.dtype)
        linear.weight = nn.Parameter(layer.float_weight())
        linear.bias = layer.bias
        replace_module(model, name, linear)
    return model


class IntWeights(Transform):
    """``int-weights``: the target linear weights held as ``bits``-bit group-wise codes and
    re-quantized with stochastic rounding after each update (Q-GaLore §3.4).

    Options: ``bits`` (8 in Q-GaLore; 2–8), ``group_size`` (256 in Q-GaLore; -1: one group per
    output row), ``stochastic`` (True: stochastic rounding)."""

    name = "int-weights"
    option_names = ("bits", *WEIGHT_ARGS)
    changes_targets = True
    needs_whole_weights = True
    replicable = False  # DDP's start-up broadcast cannot write a stride-0 handle

    def __init__(self, **options: Any) -> None:
        check_weight_options(options.get("bits", 8), {k: v for k, v in options.items() if k != "bits"})
        super().__init__(**options)
        self.bits = self.options.get("bits", 8)
        self.layer_options = {key: self.options[key] for key in WEIGHT_ARGS if key in self.options}
        self.tolerance = 1 / (2**self.bits - 1)  # nearest rounding: half a step of each group's range

    def apply(self, model: nn.Module, targets: Sequence[str] | None, exclude: Sequence[str]) -> list[str]:
        return quantize_linear_weights(model, targets, bits=self.bits, exclude=exclude, **self.layer_options)

    def applied(self, model: nn.Module) -> bool:
        layers = _quantized(model)
        return bool(layers) and all(layer.initial.bits == self.bits for layer in layers)

    def held(self, model: nn.Module) -> bool:
        return bool(_quantized(model))

    def undo(self, model: nn.Module) -> nn.Module:
        return dequantize_linear_weights(model)

    def weight_bytes(self, weight: Tensor) -> int:
        """Bytes of ``weight`` packed as the layers store it (codes, float32 scales and minima per
        group, int64 shape), packed on the ``meta`` device: nothing is allocated."""
        quantizer = IntQuantizer(bits=self.bits, group_size=self.layer_options.get("group_size", GROUP_SIZE))
        packed = quantizer.quantize(torch.empty(weight.shape, device="meta"))
        return sum(tensor.numel() * tensor.element_size() for tensor in packed.values())

    def describe(self) -> str:
        return f"{self.bits}-bit target weights"

    def found(self, model: nn.Module) -> str:
        return f"the model's targets hold {sorted({layer.initial.bits for layer in _quantized(model)}) or 'float'} weights"

    def fix(self) -> str:
        return (f"lit_lowrank.transforms.int_weights.quantize_linear_weights(model, bits={self.bits}) (or "
                f"{super().fix()})")


def _quantized(model: nn.Module) -> list[QuantizedLinear]:
    return [m for m in model.modules() if isinstance(m, QuantizedLinear)]


@hookimpl
def register_transforms(register):
    register(IntWeights.name, IntWeights)
