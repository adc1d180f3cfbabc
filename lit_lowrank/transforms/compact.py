"""The ``compact`` transform: CompAct (Shamshoum et al. 2024, "CompAct: Compressed Activations for Memory-Efficient LLM
Training"): linear layers that keep a random projection of their input for backward instead of
the input itself, so the weight gradient is born projected.

For ``y = x Wᵀ`` (W out×in, x tokens×in) the weight gradient is ``G = gᵀ x`` (out×in) with
``g = ∂L/∂y``. A :class:`CompactLinear` saves ``z = x Q`` (tokens×r), Q (in×r) being the right
basis its low-rank optimizer will use at this step, and in backward computes

    R = gᵀ z = G Q          (out×r; CompAct's compressed gradient Ĝ, its Fig. 2)

which is exactly the projection the optimizer would form from G on ``side: right``; it hands R to
the optimizer (:meth:`LowRankOptimizer.receive`, its gradient seam) and no m×n gradient is made. The
input gradient ``g W`` needs no activation. The layer's saved activations shrink from tokens·in
to tokens·r numbers. Q is the ``random`` projector's seeded Gaussian N(0, 1/r) (CompAct's
projection), regenerated from (parameter index, refresh count) and refreshed every
``update_gap`` steps: nothing to store, and a resumed run projects with the same matrices.

Usage (plain PyTorch)::

    compact_linear_layers(model)                      # before building the optimizer
    optimizer = build_optimizer(model, projector="random", side="right", rank=128)
    bind_compact(model, optimizer)                    # the layers ask it for Q, hand it R

The compressed layers' weights never get a ``.grad``: ``torch.nn.utils.clip_grad_norm_`` would
clip the other gradients by a norm without them (the Lightning paths refuse
``gradient_clip_val``), and DDP has nothing of theirs to all-reduce (refused).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.targets import linear_targets, replace_module
from lit_lowrank.plugins import get_projector, get_update_rule
from lit_lowrank.transforms.base import Transform, hide_gradient


class CompactFunction(torch.autograd.Function):
    """``F.linear`` that saves ``z = x Q`` and, in backward, delivers ``R = gᵀ z`` instead of a
    weight gradient.

    Under ``torch.autocast`` it computes as ``nn.Linear`` does: the forward's products in the
    autocast dtype (``z`` is saved in it), the backward's in the dtype of the forward's output;
    ``R`` is delivered in the weight's dtype, as autograd gives ``nn.Linear`` its weight gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, basis: Tensor,
                deliver: Callable[[Tensor], None]) -> Tensor:
        ctx.save_for_backward(x @ basis.to(x.dtype), weight)
        ctx.deliver, ctx.has_bias = deliver, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        compressed, weight = ctx.saved_tensors
        grads = grad_out.reshape(-1, grad_out.shape[-1])  # g, tokens×out
        low = grads.T @ compressed.reshape(-1, compressed.shape[-1]).to(grads.dtype)  # R = gᵀ z, out×r
        ctx.deliver(low.to(weight.dtype))
        grad_x = grad_out @ weight.to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grads.sum(0) if ctx.has_bias else None
        return grad_x, None, grad_bias, None, None


class CompactLinear(nn.Linear):
    """An ``nn.Linear`` whose training forward saves ``x Q`` instead of ``x`` (see the module
    docstring); in eval mode or without grad it is a plain linear layer. Its weight gets no
    ``.grad``: its optimizer receives ``R`` directly. Bind it with :func:`bind_compact`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        hide_gradient(self.weight)  # a weight stepped from R alone (layer-wise mode refuses it)
        self._optimizer: Any = None  # a LowRankOptimizer

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> CompactLinear:
        """A CompactLinear holding ``linear``'s own weight and bias (the same parameters)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        hide_gradient(layer.weight)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and torch.is_grad_enabled() and self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        if self._optimizer is None:
            raise RuntimeError("a CompactLinear trains through its low-rank optimizer: call "
                               "lit_lowrank.transforms.compact.bind_compact(model, optimizer) after building it")
        _, basis = self._optimizer.upcoming_bases(self.weight)
        return CompactFunction.apply(x, self.weight, self.bias, basis, self._deliver)

    def _deliver(self, low: Tensor) -> None:
        self._optimizer.receive(self.weight, low, accumulate=True)


def compact_linear_layers(model: nn.Module, targets: Sequence[str] | None = None,
                          exclude: Sequence[str] = ()) -> list[str]:
    """Replace, in place, the target layers of :func:`lit_lowrank.select_targets` (same
    ``targets``/``exclude`` as the optimizer's) by :class:`CompactLinear` layers sharing their
    parameters; returns the replaced names. A layer registered under several names is replaced
    under all of them by one :class:`CompactLinear` (each call adds its ``R``).

    Raises:
        ValueError: if there is no target, a target is not an ``nn.Linear``, or a target's weight
            is tied to another module's (that module's gradient would never reach the optimizer,
            which steps these weights from ``R`` alone).
    """
    chosen = linear_targets(model, targets, exclude, "CompAct compresses the inputs of",
                            accepts=lambda module: type(module) is nn.Linear)  # a subclass has its own forward
    for name, linear in chosen.items():
        replace_module(model, name, CompactLinear.from_linear(linear))
    return list(chosen)


def bind_compact(model: nn.Module, optimizer: Any) -> list[CompactLinear]:
    """Bind every :class:`CompactLinear` of ``model`` to ``optimizer``, after checking that the
    optimizer (a :class:`~lit_lowrank.LowRankOptimizer`) projects its weight the way the layer
    computes ``R``.

    Raises:
        ValueError: a layer's weight not in a low-rank group of ``optimizer``; a projector that
            needs the gradient to find its basis (CompAct's basis must be known in forward:
            ``projector: random``); a side other than ``right`` (the projected dimension is the
            input's); a rule that reads the full gradient (Fira, APOLLO); several processes
            (DDP all-reduces ``.grad``, which these weights do not have).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        raise ValueError("CompAct layers deliver R to the optimizer instead of a .grad, which DDP would not "
                         "all-reduce; train them in a single process")
    layers = [m for m in model.modules() if isinstance(m, CompactLinear)]
    if not layers:
        raise ValueError("the model has no CompactLinear layer; call compact_linear_layers(model) first")
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for layer in layers:
        group = groups.get(id(layer.weight))
        if group is None or not group["lowrank"]:
            raise ValueError("a CompactLinear's weight must be a low-rank target of the optimizer; build it with the "
                             "same targets/exclude as compact_linear_layers")
        check_compact_options(group)
        layer._optimizer = optimizer
    return layers


def check_compact_options(options: Mapping[str, Any]) -> None:
    """Refuse options under which a low-rank optimizer cannot step from CompAct's ``R``: a
    projector that needs the gradient to find its basis, a side other than ``right``, a rule
    that reads the full gradient."""
    if get_projector(options["projector"]).needs_gradient:
        raise ValueError(f"projector {options['projector']!r} fits its basis to the gradient, which CompAct never "
                         "forms; use projector: random (CompAct's Gaussian projection)")
    if options["side"] != "right":
        raise ValueError(f"CompAct projects the input dimension of each layer: set side: right (got {options['side']!r})")
    if get_update_rule(options["rule"]).uses_gradient:
        raise ValueError(f"rule {options['rule']!r} reads the full gradient, which CompAct never forms; use rule: galore")


class Compact(Transform):
    """``compact``: CompAct's layers (no options). Their weights get ``R`` instead of a ``.grad``
    (:attr:`hides_gradients`); they are bound to the optimizer after it is built."""

    name = "compact"
    changes_targets = True
    needs_whole_weights = True  # R = gᵀ x Q is formed on the whole input dimension
    hides_gradients = True

    def apply(self, model: nn.Module, targets: Sequence[str] | None, exclude: Sequence[str]) -> list[str]:
        return compact_linear_layers(model, targets, exclude)

    def applied(self, model: nn.Module) -> bool:
        return any(isinstance(module, CompactLinear) for module in model.modules())

    def bind(self, model: nn.Module, optimizer: Any) -> None:
        bind_compact(model, optimizer)

    def undo(self, model: nn.Module) -> nn.Module:
        """Plain ``nn.Linear`` layers holding the compressed layers' own parameters."""
        for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, CompactLinear)]:
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            linear.weight, linear.bias = layer.weight, layer.bias
            hide_gradient(layer.weight, hidden=False)
            replace_module(model, name, linear)
        return model

    def check_options(self, options: Mapping[str, Any]) -> None:
        check_compact_options(options)

    def describe(self) -> str:
        return "compressed linear layers"

    def fix(self) -> str:
        return ("lit_lowrank.transforms.compact.compact_linear_layers(model) before building the optimizer and "
                "bind_compact(model, optimizer) after")


@hookimpl
def register_transforms(register: Any) -> None:
    register(Compact.name, Compact)
