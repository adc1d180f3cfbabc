"""The model-transform component kind: what a method changes in the model before its optimizer is
built (Q-GaLore's INT8 weights, GradNormLoRP's weight norm, CompAct's layers, a plugin's own).

A :class:`Transform` is constructed with its options, applied in place to the model's low-rank
targets once, says whether a model holds it, binds to the optimizer where its layers talk to it,
and is undone where that is possible. Its class flags say what it excludes, so every entry path
refuses the same combinations:

* :attr:`Transform.needs_whole_weights` — every rank must hold whole weights: refused under
  sharded weights (FSDP);
* :attr:`Transform.hides_gradients` — its weights get no ``.grad``: refused with gradient-norm
  clipping, fp16 loss scaling, layer-wise updates and low-rank DDP communication.

Weights the optimizer must read and write in another format (INT8 codes) reach it through one
typed protocol, :class:`StoredWeight`, found with :func:`stored_weight`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Protocol, Sequence, runtime_checkable

from torch import Tensor, nn

_STORE_ATTRIBUTE = "weight_store"
"""The parameter attribute holding its :class:`StoredWeight` (read only by :func:`stored_weight`)."""


@runtime_checkable
class StoredWeight(Protocol):
    """A weight stored in another format than its parameter: the optimizer updates
    :meth:`float_weight` and hands the result back to :meth:`store_`."""

    def float_weight(self) -> Tensor:
        """A fresh float copy of the weight, in the parameter's dtype."""

    def store_(self, weight: Tensor) -> None:
        """Store the updated float ``weight`` in the layer's own format."""

    def state_dict(self) -> dict[str, Any]:
        """The stored format's state (a failed step restores it, see optim/guard.py)."""

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> Any:
        """Restore the state :meth:`state_dict` gave."""


def attach_store(parameter: nn.Parameter, store: StoredWeight) -> None:
    """Make ``store`` the storage of ``parameter`` (what :func:`stored_weight` returns for it)."""
    if not isinstance(store, StoredWeight):
        raise TypeError(f"{type(store).__name__} is not a StoredWeight (float_weight() and store_(weight))")
    setattr(parameter, _STORE_ATTRIBUTE, store)


def stored_weight(parameter: Tensor) -> StoredWeight | None:
    """The :class:`StoredWeight` holding ``parameter``'s value, or None for an ordinary weight."""
    store = getattr(parameter, _STORE_ATTRIBUTE, None)
    return store if store is not None and isinstance(store, StoredWeight) else None


_HIDDEN_ATTRIBUTE = "compact_activations"
"""The parameter attribute marking a weight whose gradient a transform hides (read only by
:func:`gradient_hidden`; the name checkpoints and older code know)."""


def hide_gradient(parameter: nn.Parameter, hidden: bool = True) -> None:
    """Mark ``parameter`` as stepped without a ``.grad`` (its transform hands the optimizer its
    updates, as CompAct's ``R``), or unmark it (``hidden=False``)."""
    if hidden:
        setattr(parameter, _HIDDEN_ATTRIBUTE, True)
    elif hasattr(parameter, _HIDDEN_ATTRIBUTE):
        delattr(parameter, _HIDDEN_ATTRIBUTE)


def gradient_hidden(parameter: Tensor) -> bool:
    """Whether a transform hides ``parameter``'s gradient (it never gets a ``.grad``)."""
    return bool(getattr(parameter, _HIDDEN_ATTRIBUTE, False))


class Transform:
    """Base class of model transforms; subclasses set :attr:`name`, :attr:`options` (the option
    names the constructor accepts) and implement :meth:`apply` and :meth:`applied`.

    Args:
        **options: the transform's own options (e.g. ``bits`` of ``int-weights``); unknown names
            are refused, naming the accepted ones.
    """

    name: ClassVar[str] = ""
    option_names: ClassVar[tuple[str, ...]] = ()
    needs_whole_weights: ClassVar[bool] = False
    """Every rank must hold whole weights (refused under FSDP's sharded weights)."""
    changes_targets: ClassVar[bool] = False
    """It changes the target layers themselves (their class or parameters): two such transforms
    cannot share the targets."""
    hides_gradients: ClassVar[bool] = False
    """Its weights get no ``.grad`` (refused with clipping, fp16 scaling, layer-wise, low-rank DDP)."""
    replicable: ClassVar[bool] = True
    """torch's ``DistributedDataParallel`` can broadcast its weights when it wraps the model
    (False: weights with no storage of their own, refused under Lightning's DDP strategies)."""
    tolerance: ClassVar[float] = 0.0
    """The largest relative change of the model's outputs that :meth:`apply` may cause (rounding)."""
    estimated_applied: ClassVar[bool] = False
    """The memory estimate needs a model holding it (it changes the parameters themselves, as
    ``weight-norm``'s ``g`` and ``V``); otherwise the plain model is estimated, its targets counted
    by :meth:`weight_bytes` (see :func:`lit_lowrank.memory.estimate`)."""
    adopts_modules: ClassVar[bool] = True
    """Whether an existing module may be transformed at Lightning setup (False: a transform that
    replaces parameters, which the user's ``configure_optimizers`` may have captured, must be
    applied by the user before)."""

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.option_names))
        if unknown:
            raise ValueError(f"transform {self.name!r} has no option(s) {unknown}; its options are "
                             f"{list(self.option_names)}")
        self.options = dict(options)

    def apply(self, model: nn.Module, targets: Sequence[str] | None, exclude: Sequence[str]) -> list[str]:
        """Transform ``model``'s ``targets`` (minus ``exclude``) in place; returns their names.
        Raises ValueError when there is no target, a target it cannot transform, or a tied weight."""
        raise NotImplementedError

    def applied(self, model: nn.Module) -> bool:
        """Whether ``model`` holds this transform with these options."""
        raise NotImplementedError

    def held(self, model: nn.Module) -> bool:
        """Whether ``model`` holds this transform with any options (default: :meth:`applied`)."""
        return self.applied(model)

    def describe(self) -> str:
        """What a model holding the transform has, for messages (``"8-bit target weights"``)."""
        return f"targets transformed by {self.name!r}"

    def found(self, model: nn.Module) -> str:
        """What ``model`` holds instead, for the message refusing it."""
        return "the model does not hold them"

    def fix(self) -> str:
        """The call that applies the transform, for messages."""
        return (f"lit_lowrank.transforms.prepare(model, {{{self.name!r}: {self.options}}}, targets, exclude) before "
                "building the optimizer")

    def bind(self, model: nn.Module, optimizer: Any) -> None:
        """Connect the transformed layers to the optimizer built over ``model`` (default: nothing)."""

    def undo(self, model: nn.Module) -> nn.Module:
        """Give ``model`` back its plain layers, computing the same function; raises
        NotImplementedError where a transform cannot be undone."""
        raise NotImplementedError(f"transform {self.name!r} cannot be undone")

    def weight_bytes(self, weight: Tensor) -> int:
        """Bytes a target ``weight`` (any device, ``meta`` included; shape and dtype are read) takes
        in a model holding the transform, for the memory estimate (default: the weight's own)."""
        return weight.numel() * weight.element_size()

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Refuse optimizer ``options`` (a param group's or a config's) the transform cannot train
        with (default: none)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options.items())})"
