"""The option schema: every :class:`~lit_lowrank.LowRankOptimizer` option once, with its default
and what it is.

Each field's metadata says which roles the option plays; the lists the library needs are derived
from it (:func:`having`), never written out again:

=============  ==============================================================================
role           meaning (who reads the list)
=============  ==============================================================================
``method``     a :class:`~lit_lowrank.methods.Method` may set it (method merging, the
               ``lowrank:`` fields a method fills in)
``defining``   makes a method what it is: set to another value than the method's, refused
``state``      shapes the saved state: a checkpoint with another value is refused
``builds``     the group's inner optimizer and rule are built from it (rebuilt when it changes)
``dense``      applies to dense groups too (checked on resume for them)
``user``       a training hyper-parameter the user's own torch optimizer holds (kept when an
               adopted optimizer is converted; the module's ``configure_optimizers`` owns it)
=============  ==============================================================================

``kind`` names the registry kind of an option that names a registered component.

Adding an option: one field here, one keyword of :class:`~lit_lowrank.LowRankOptimizer` (its
signature is checked against this schema by the tests), and its ``lowrank:`` field if the YAML
config should set it.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

MAX_CONSECUTIVE_SKIPS = 25
"""``max_consecutive_skips``' default: a run whose every update of a weight was skipped this many
times in a row stops (see :mod:`lit_lowrank.optim.guard`)."""

SEED_STRIDE = 2**32
"""A weight's projector seed is its parameter index + ``projector_seed`` · ``SEED_STRIDE``: one
run's weights draw apart (fewer than 2³² parameters), and so do runs of other projector seeds;
0 keeps the parameter index (the draws of runs before the option)."""

ROLES = ("method", "defining", "state", "builds", "dense", "user")


def option(default: Any = MISSING, *, kind: str | None = None, factory: Any = MISSING, **roles: bool) -> Any:
    """A schema field: its default (or ``factory``), the registry ``kind`` it names, its roles."""
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}; roles are {ROLES}")
    metadata = {"kind": kind, "roles": frozenset(role for role, on in roles.items() if on)}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class LowRankOptions:
    """What one param group of a :class:`~lit_lowrank.LowRankOptimizer` is configured with; see
    its docstring for each option's meaning."""

    lr: float = option(1e-3, dense=True, user=True)
    betas: tuple[float, float] | None = option(None, builds=True, dense=True, user=True)
    eps: float | None = option(None, builds=True, dense=True, user=True)
    weight_decay: float = option(0.0, dense=True, user=True)
    rank: int = option(128, method=True, state=True)
    projector: str = option("svd", kind="projectors", method=True, defining=True, state=True)
    side: str = option("std", method=True, defining=True, state=True)
    update_gap: int = option(200, method=True)
    scale: float = option(0.25, method=True, builds=True)
    rule: str = option("galore", kind="update_rules", method=True, defining=True, state=True, builds=True)
    inner: str = option("adamw", kind="inner_optimizers", method=True, defining=True, state=True, builds=True)
    schedule: str = option("fixed", kind="schedules", method=True, defining=True, state=True)
    on_refresh: str = option("keep", method=True)
    projector_args: dict[str, Any] = option(factory=dict, method=True, state=True)
    rule_args: dict[str, Any] = option(factory=dict, method=True, builds=True)
    inner_args: dict[str, Any] = option(factory=dict, method=True, state=True, builds=True)
    schedule_args: dict[str, Any] = option(factory=dict, method=True)
    nonfinite: str = option("skip", dense=True)
    max_consecutive_skips: int | None = option(MAX_CONSECUTIVE_SKIPS, dense=True)
    refresh_sharing: str = option("auto")
    projector_seed: int = option(0, state=True)


def names() -> tuple[str, ...]:
    """Every option, in the schema's order (``LowRankOptimizer``'s keyword arguments)."""
    return tuple(f.name for f in fields(LowRankOptions))


def having(role: str) -> tuple[str, ...]:
    """The options playing ``role`` (one of :data:`ROLES`), in the schema's order."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles are {ROLES}")
    return tuple(f.name for f in fields(LowRankOptions) if role in f.metadata["roles"])


def defaults(names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Fresh default values of ``names`` (default: every option)."""
    values = vars(LowRankOptions())
    return {name: _fresh(values[name]) for name in (names or values)}


def component_kinds() -> dict[str, str]:
    """``{option: registry kind}`` of the options naming a registered component."""
    return {f.name: f.metadata["kind"] for f in fields(LowRankOptions) if f.metadata["kind"]}


def _fresh(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else value
