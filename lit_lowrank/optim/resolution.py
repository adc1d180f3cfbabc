"""One resolution of a run: what the user wrote — a method name and options, through any way in
(``build_optimizer`` keywords, the YAML ``lowrank:`` section, a callback's or strategy's
arguments) — turned into every optimizer option and model transform the run trains with.

Every entry path calls :func:`resolve`; none re-derives what a method means:

* an option the user set is kept; one that contradicts what the method is (the schema's
  ``defining`` role: projector, rule, inner optimizer, ...) is refused; one that tunes it
  (``rank``, ``scale``, ``*_args``) replaces the method's with a warning (:meth:`Method.merged`);
* a method option the user left unset (``None``) takes the method's value, else the schema's
  default (:mod:`lit_lowrank.options`);
* :attr:`Run.chosen` names what the user or the method set, so a path that converts a user's own
  optimizer knows which of its settings the run overrides (a method's inner optimizer replaces
  the converted one).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping

from lit_lowrank.methods import OPTION_KEYS, TRANSFORMS, Method
from lit_lowrank.options import defaults, names
from lit_lowrank.plugins import get_method


@dataclass(frozen=True)
class Run:
    """A resolved run.

    Args:
        method: the method's name (or :class:`Method`), None without one.
        options: every :class:`~lit_lowrank.LowRankOptimizer` option (the schema's names).
        transforms: the model transforms (``gradnorm``, ``weight_bits``, ``compact``).
        chosen: the option and transform names the user or the method set.
    """

    method: str | Method | None
    options: dict[str, Any]
    transforms: dict[str, Any]
    chosen: frozenset[str]


def resolve(method: str | Method | None, explicit: Mapping[str, Any]) -> Run:
    """The run ``explicit`` options (None: unset, for a method option or transform) ask for
    under ``method`` (a registered name, a :class:`Method` or None).

    Raises:
        TypeError: for a name that is neither an optimizer option nor a transform.
        ValueError: for an option contradicting what the method is.
        UnknownComponentError: for an unregistered method name (the message lists them).
    """
    unknown = sorted(set(explicit) - set(names()) - set(TRANSFORMS))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; the options are {list(names())} and the transforms "
                        f"{list(TRANSFORMS)}")
    unsettable = (*OPTION_KEYS, *TRANSFORMS)
    given = {key: value for key, value in explicit.items() if value is not None or key not in unsettable}
    recipe = get_method(method) if isinstance(method, str) else method
    settings = recipe.merged(str(method), given) if recipe is not None else dict(given)
    settings.update({key: value for key, value in given.items() if value is None})  # e.g. no skip bound
    values = {**defaults(), **TRANSFORMS, **copy.deepcopy(settings)}
    chosen = frozenset(given) | frozenset(recipe.settings() if recipe is not None else ())
    return Run(method, {key: values[key] for key in names()}, {key: values[key] for key in TRANSFORMS}, chosen)
