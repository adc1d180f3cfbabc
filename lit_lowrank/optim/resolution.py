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

from lit_lowrank.methods import LEGACY_TRANSFORMS, OPTION_KEYS, TRANSFORMS_KEY, Method, legacy_transforms
from lit_lowrank.options import defaults, names
from lit_lowrank.plugins import get_method


@dataclass(frozen=True)
class Run:
    """A resolved run.

    Args:
        method: the method's name (or :class:`Method`), None without one.
        options: every :class:`~lit_lowrank.LowRankOptimizer` option (the schema's names).
        transforms: the model transforms, ``{registered name: options}`` (:mod:`lit_lowrank.transforms`).
        chosen: the option and transform names the user or the method set.
    """

    method: str | Method | None
    options: dict[str, Any]
    transforms: dict[str, dict[str, Any]]
    chosen: frozenset[str]


def resolve(method: str | Method | None, explicit: Mapping[str, Any]) -> Run:
    """The run ``explicit`` options (None: unset, for a method option or ``transforms``) ask for
    under ``method`` (a registered name, a :class:`Method` or None). ``transforms`` is
    ``{name: options}``; the deprecated ``weight_bits``/``weight_args``/``gradnorm``/``compact``
    spellings are read as it, with a DeprecationWarning.

    Raises:
        TypeError: for a name that is neither an optimizer option nor ``transforms``.
        ValueError: for an option or transform contradicting what the method is.
        UnknownComponentError: for an unregistered method name (the message lists them).
    """
    recipe = get_method(method) if isinstance(method, str) else method
    explicit = _without_aliases(explicit, recipe, str(method))
    unknown = sorted(set(explicit) - set(names()) - {TRANSFORMS_KEY})
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; the options are {list(names())} and {TRANSFORMS_KEY!r}")
    unsettable = (*OPTION_KEYS, TRANSFORMS_KEY)
    given = {key: value for key, value in explicit.items() if value is not None or key not in unsettable}
    settings = recipe.merged(str(method), given) if recipe is not None else dict(given)
    settings.update({key: value for key, value in given.items() if value is None})  # e.g. no skip bound
    values = {**defaults(), TRANSFORMS_KEY: {}, **copy.deepcopy(settings)}
    chosen = frozenset(given) | frozenset(recipe.settings() if recipe is not None else ())
    transforms = {name: dict(options or {}) for name, options in values[TRANSFORMS_KEY].items()}
    return Run(method, {key: values[key] for key in names()}, transforms, chosen)


def _without_aliases(explicit: Mapping[str, Any], recipe: Method | None, name: str) -> dict[str, Any]:
    """``explicit`` with the deprecated transform spellings folded into ``transforms`` (with a
    DeprecationWarning). A flag set to false that turns off a transform of the method is refused,
    as the method's ``transforms`` contradicted would be."""
    legacy = {key: explicit[key] for key in LEGACY_TRANSFORMS if key in explicit}
    rest = {key: value for key, value in explicit.items() if key not in LEGACY_TRANSFORMS}
    held = recipe.transforms if recipe is not None else {}
    off = [key for key, value in legacy.items() if value is False and LEGACY_TRANSFORMS[key] in held]
    if off:
        raise ValueError(f"{off[0]}=False contradicts method {name!r}, whose transforms are {held!r}; drop "
                         f"{off[0]} (or the method) from the config")
    aliased = legacy_transforms(legacy, stacklevel=5)
    if aliased:
        rest[TRANSFORMS_KEY] = {**(rest.get(TRANSFORMS_KEY) or {}), **aliased}
    return rest
