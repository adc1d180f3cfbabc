"""Named methods: the settings a paper's method stands for, in one table.

A :class:`Method` is a recipe — :class:`~lit_lowrank.LowRankOptimizer` options plus the model
transforms the method needs — registered by name through the ``register_methods`` hook, so a
plugin can ship a whole recipe. ``build_optimizer(model, method="fira")``, ``lowrank: {method:
fira}`` in YAML, the memory estimator, the benchmarks and the README's method table all read it
from here.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import InitVar, dataclass, field
from typing import Any, Mapping

from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.options import having

OPTION_KEYS = having("method")
"""The optimizer options a method may set: what makes the method, not training hyper-parameters
(``lr``, ``betas``, ``weight_decay``, the LR schedule stay the user's)."""

TRANSFORMS_KEY = "transforms"
"""The setting naming a method's model transforms, ``{name: options}`` (registered through
``register_transforms``): the model must hold them before the optimizer is built, since the
optimizer trains what the model holds."""

LEGACY_TRANSFORMS = {"weight_bits": "int-weights", "weight_args": "int-weights", "gradnorm": "weight-norm",
                     "compact": "compact"}
"""The old spellings of the built-in transforms (deprecated aliases) and the transform each names."""

INT4_BASIS = {"quantizer": "int", "quantizer_args": {"bits": 4, "group_size": 256}}
"""Q-GaLore's projection basis: INT4 codes, asymmetric, one scale and minimum per 256 values."""


@dataclass(frozen=True)
class Method:
    """A recipe.

    Args:
        description: one line: what it computes.
        options: :class:`~lit_lowrank.LowRankOptimizer` keyword arguments (``projector``,
            ``rule``, ``inner``, ``schedule``, ``scale``, ``rank``, ``*_args`` …); see
            :meth:`merged` for options a user sets too.
        transforms: the model transforms, ``{registered name: options}`` (``int-weights``:
            Q-GaLore's INT8 weights, ``weight-norm``: GradNormLoRP, ``compact``: CompAct; see
            :mod:`lit_lowrank.transforms`).
        paper: the reference.
        weight_bits, gradnorm, compact: deprecated spellings of ``transforms`` (a
            DeprecationWarning names the new one).
    """

    description: str
    options: dict[str, Any] = field(default_factory=dict)
    transforms: dict[str, dict[str, Any]] = field(default_factory=dict)
    paper: str = ""
    weight_bits: InitVar[int | None] = None
    gradnorm: InitVar[bool] = False
    compact: InitVar[bool] = False

    def __post_init__(self, weight_bits: int | None, gradnorm: bool, compact: bool) -> None:
        unknown = sorted(set(self.options) - set(OPTION_KEYS))
        if unknown:
            raise ValueError(f"a Method sets only {OPTION_KEYS}, not {unknown}")
        aliased = legacy_transforms({"weight_bits": weight_bits, "gradnorm": gradnorm or None,
                                     "compact": compact or None}, stacklevel=4)
        object.__setattr__(self, "transforms", {**copy.deepcopy(self.transforms), **aliased})

    def settings(self) -> dict[str, Any]:
        """Everything the recipe sets, as ``lowrank:`` keys of a YAML config."""
        return {**self.options, **({TRANSFORMS_KEY: self.transforms} if self.transforms else {})}

    def merged(self, name: str, explicit: dict[str, Any]) -> dict[str, Any]:
        """The method's settings with ``explicit`` ones (not None) on top. An explicit value
        that changes what the method *is* (:data:`DEFINING`) is refused; one that tunes it
        (``scale``, ``rank``, ``*_args``, ...) replaces the method's with a warning."""
        settings = copy.deepcopy(self.settings())
        explicit = dict(explicit)
        if explicit.get(TRANSFORMS_KEY) is not None and TRANSFORMS_KEY in settings:
            explicit[TRANSFORMS_KEY] = merged_transforms(name, self.transforms, explicit[TRANSFORMS_KEY])
        for key, value in explicit.items():
            if value is None or key not in settings or _plain(value) == _plain(settings[key]):
                continue
            if key == TRANSFORMS_KEY:  # options the method leaves to the user (merged_transforms)
                continue
            if key in DEFINING:
                raise ValueError(f"{key}={value!r} contradicts method {name!r}, whose {key} is {settings[key]!r}; "
                                 f"drop {key} (or the method) from the config")
            warnings.warn(f"{key}={value!r} replaces method {name!r}'s {key}={settings[key]!r}", UserWarning,
                          stacklevel=3)
        return {**settings, **{k: v for k, v in explicit.items() if v is not None}}


def merged_transforms(name: str, method: Mapping[str, Mapping[str, Any]],
                      explicit: Mapping[str, Mapping[str, Any] | None]) -> dict[str, dict[str, Any]]:
    """The method's transforms with the user's options on top. The user's must name the same
    transforms and keep every option the method sets (those define it); options the method leaves
    unset are the user's to choose.

    Raises:
        ValueError: for another set of transforms or a changed option, naming the method's.
    """
    contradiction = (f"transforms={dict(explicit)!r} contradicts method {name!r}, whose transforms are "
                     f"{dict(method)!r}; drop transforms (or the method) from the config, or add only options "
                     "the method leaves unset")
    if set(explicit) != set(method):
        raise ValueError(contradiction)
    merged = {}
    for transform, options in method.items():
        mine = dict(explicit[transform] or {})
        if any(_plain(mine.get(key, value)) != _plain(value) for key, value in options.items()):
            raise ValueError(contradiction)
        merged[transform] = {**copy.deepcopy(dict(options)), **mine}
    return merged


def legacy_transforms(values: Mapping[str, Any], stacklevel: int = 3) -> dict[str, dict[str, Any]]:
    """The transforms that the deprecated spellings in ``values`` (:data:`LEGACY_TRANSFORMS`: a
    ``weight_bits`` width with its ``weight_args``, ``gradnorm: true``, ``compact: true``) ask
    for, each with a DeprecationWarning naming the new spelling; unset ones (None) ask for none.

    Raises:
        ValueError: ``weight_args`` without ``weight_bits`` (they would be ignored).
    """
    bits, args = values.get("weight_bits"), values.get("weight_args") or {}
    if bits is None and args:
        raise ValueError(f"weight_args={args} configures quantized weights, but weight_bits is null; set "
                         "weight_bits (8 in Q-GaLore) or remove weight_args")
    asked = {}
    if bits is not None:
        asked["int-weights"] = {"bits": bits, **args}
    for flag, transform in (("gradnorm", "weight-norm"), ("compact", "compact")):
        if values.get(flag):
            asked[transform] = {}
    if asked:
        warnings.warn(f"{sorted(k for k in LEGACY_TRANSFORMS if values.get(k))} are deprecated; write "
                      f"transforms={asked} (YAML: lowrank.transforms)", DeprecationWarning, stacklevel=stacklevel)
    return asked


DEFINING = (*having("defining"), TRANSFORMS_KEY)
"""Settings that make a method what it is: set explicitly to another value, they are refused."""


def _plain(value: Any) -> Any:
    """Tuples as lists (YAML gives lists), recursively, for comparing settings."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


BUILTIN_METHODS: dict[str, Method] = {
    "galore": Method("every T steps a thin SVD of G; Adam on R = PᵀG; W ← W − η·α·P N (Alg. 1)",
                     {}, paper="Zhao et al. 2024, GaLore"),
    "galore-rsvd": Method("GaLore with a randomized SVD (Halko et al. range finder)",
                          {"projector": "rsvd"}),
    "galore-warm": Method("GaLore whose SVD basis is tracked: exact SVD at the first refresh, then subspace "
                          "iteration from the previous basis (QR and a d×r Ritz SVD, no SVD of G)",
                          {"projector": "svd-warm"},
                          paper="Golub & Van Loan, Matrix Computations, orthogonal iteration"),
    "galore-dct": Method("GaLore with the top-r DCT-II columns instead of an SVD",
                         {"projector": "dct"}, paper="Modoranu et al. 2025, SVD-free low-rank adaptive gradient"),
    "online-pca": Method("one online-PCA step per optimizer step instead of a periodic SVD",
                         {"projector": "online-pca", "schedule": "every-step"},
                         paper="Liang et al. 2024, Online Subspace Descent"),
    "galore-random": Method("GaLore with a seeded Gaussian projection", {"projector": "random"}),
    "adaptive-rank": Method("per-layer rank: the smallest with spectral energy ≥ τ, under a global budget",
                            {"projector": "adaptive-rank"}),
    "fira": Method("GaLore + the norm-scaled residual G − P PᵀG, norm-growth limiter",
                   {"rule": "fira"}, paper="Chen et al. 2024, Fira"),
    "apollo": Method("G scaled per channel by ‖N_j‖/‖R_j‖ from random-projected Adam",
                     {"projector": "random", "rule": "apollo", "scale": 1.0}, paper="Zhu et al. 2024, APOLLO"),
    "apollo-mini": Method("APOLLO at rank 1 with one tensor-wise ratio, α = 128",
                          {"projector": "random", "rule": "apollo-mini", "rank": 1}, paper="Zhu et al. 2024, APOLLO"),
    "snsm": Method("momentum in the subspace, SGD in its complement, one adaptive step size per row or column",
                   {"rule": "snsm", "inner": "momentum", "scale": 1.0, "on_refresh": "reset"},
                   paper="Nguyen et al. 2025, Subset-Norm and Subspace-Momentum"),
    "galore-sn": Method("GaLore with subset-norm Adam on R: one second moment per row or column of R",
                        {"inner": "adamw-sn"}, paper="Nguyen et al. 2025, Subset-Norm and Subspace-Momentum"),
    "galore-adafactor": Method("factored second moment on R, update clipping", {"inner": "adafactor"},
                               paper="Zhao et al. 2024, GaLore"),
    "galore-lion": Method("Lion's sign update on R (Lion's own betas (0.9, 0.99) unless betas is set)",
                          {"inner": "lion"}, paper="Chen et al. 2023, Symbolic Discovery of Optimization Algorithms"),
    "galore-8bit": Method("Adam moments kept 8-bit blockwise between steps", {"inner": "adamw8bit"},
                          paper="Zhao et al. 2024, GaLore"),
    "q-galore": Method("INT4 basis, lazy layer-adaptive refresh, 8-bit moments, INT8 weights",
                       {"inner": "adamw8bit", "schedule": "lazy", "projector_args": INT4_BASIS},
                       transforms={"int-weights": {"bits": 8}}, paper="Zhang et al. 2024, Q-GaLore"),
    "gradnorm": Method("W = g·V/‖V‖: V gets GaLore-projected Adam, g dense Adam", {},
                       transforms={"weight-norm": {}},
                       paper="Huang et al. 2024, GradNormLoRP"),
    "gradnorm-8bit": Method("GradNormLoRP with 8-bit moments", {"inner": "adamw8bit"},
                            transforms={"weight-norm": {}},
                            paper="Huang et al. 2024, GradNormLoRP"),
    "compact": Method("linear layers save x·Q instead of x for backward and hand the optimizer R = G·Q "
                      "(a seeded Gaussian Q, GaLore's update)", {"projector": "random", "side": "right"},
                      transforms={"compact": {}}, paper="Shamshoum et al. 2024, CompAct"),
}


@hookimpl
def register_methods(register):
    for name, method in BUILTIN_METHODS.items():
        register(name, method)
