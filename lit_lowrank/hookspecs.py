"""The plugin contract: one hook per kind of component, each handed a ``register`` callback.

A plugin module implements any of these with ``@lit_lowrank.hookimpl`` and calls
``register(name, cls)`` once per component it provides (``register(name, method)`` for
named methods). Built-in components are registered
through exactly these hooks (see ``lit_lowrank/builtins.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    from lit_lowrank.methods import Method

hookspec = pluggy.HookspecMarker("lit_lowrank")
hookimpl = pluggy.HookimplMarker("lit_lowrank")

Register = Callable[[str, type], None]


@hookspec
def register_projectors(register: Register) -> None:
    """Call ``register(name, cls)`` for each :class:`~lit_lowrank.Projector` subclass."""


@hookspec
def register_quantizers(register: Register) -> None:
    """Call ``register(name, cls)`` for each :class:`~lit_lowrank.Quantizer` subclass."""


@hookspec
def register_update_rules(register: Register) -> None:
    """Call ``register(name, cls)`` for each :class:`~lit_lowrank.UpdateRule` subclass."""


@hookspec
def register_inner_optimizers(register: Register) -> None:
    """Call ``register(name, cls)`` for each :class:`~lit_lowrank.InnerOptimizer` subclass."""


@hookspec
def register_schedules(register: Register) -> None:
    """Call ``register(name, cls)`` for each :class:`~lit_lowrank.Schedule` subclass."""


@hookspec
def register_transforms(register: Register) -> None:
    """Call ``register(name, cls)`` for each :class:`~lit_lowrank.transforms.Transform` subclass:
    a change of the model that a method names (``Method(..., transforms={name: options})``)."""


@hookspec
def register_methods(register: Callable[[str, "Method"], None]) -> None:
    """Call ``register(name, method)`` for each :class:`~lit_lowrank.methods.Method`: a named
    recipe of the components above (``build_optimizer(model, method=name)``)."""
