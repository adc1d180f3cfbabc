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
from dataclasses import dataclass, field
from typing import Any

from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.options import having

OPTION_KEYS = having("method")
"""The optimizer options a method may set: what makes the method, not training hyper-parameters
(``lr``, ``betas``, ``weight_decay``, the LR schedule stay the user's)."""

TRANSFORMS = {"gradnorm": False, "weight_bits": None, "compact": False}
"""The model transforms a method may ask for, with their values when it does not: the model must
hold them before the optimizer is built, since the optimizer trains what the model holds."""

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
        weight_bits: target weights held as integer codes of this many bits
            (:func:`~lit_lowrank.quantizers.quantized_linear.quantize_linear_weights`; Q-GaLore: 8).
        gradnorm: target weights are weight-normalized first
            (:func:`~lit_lowrank.reparam.gradnorm.apply_gradnorm`; GradNormLoRP).
        compact: target linear layers save compressed activations and hand the optimizer ``R``
            (:func:`~lit_lowrank.activations.compact_linear_layers`; CompAct).
        paper: the reference.
    """

    description: str
    options: dict[str, Any] = field(default_factory=dict)
    weight_bits: int | None = None
    gradnorm: bool = False
    compact: bool = False
    paper: str = ""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.options) - set(OPTION_KEYS))
        if unknown:
            raise ValueError(f"a Method sets only {OPTION_KEYS}, not {unknown}")

    def settings(self) -> dict[str, Any]:
        """Everything the recipe sets, as ``lowrank:`` keys of a YAML config."""
        extra = {"weight_bits": self.weight_bits} if self.weight_bits is not None else {}
        flags = {flag: True for flag in ("gradnorm", "compact") if getattr(self, flag)}
        return {**self.options, **extra, **flags}

    def merged(self, name: str, explicit: dict[str, Any]) -> dict[str, Any]:
        """The method's settings with ``explicit`` ones (not None) on top. An explicit value
        that changes what the method *is* (:data:`DEFINING`) is refused; one that tunes it
        (``scale``, ``rank``, ``*_args``, ...) replaces the method's with a warning."""
        settings = copy.deepcopy(self.settings())
        for key, value in explicit.items():
            if value is None or key not in settings or _plain(value) == _plain(settings[key]):
                continue
            if key in DEFINING:
                raise ValueError(f"{key}={value!r} contradicts method {name!r}, whose {key} is {settings[key]!r}; "
                                 f"drop {key} (or the method) from the config")
            warnings.warn(f"{key}={value!r} replaces method {name!r}'s {key}={settings[key]!r}", UserWarning,
                          stacklevel=3)
        return {**settings, **{k: v for k, v in explicit.items() if v is not None}}


DEFINING = (*having("defining"), *TRANSFORMS)
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
                       weight_bits=8, paper="Zhang et al. 2024, Q-GaLore"),
    "gradnorm": Method("W = g·V/‖V‖: V gets GaLore-projected Adam, g dense Adam", {}, gradnorm=True,
                       paper="Huang et al. 2024, GradNormLoRP"),
    "gradnorm-8bit": Method("GradNormLoRP with 8-bit moments", {"inner": "adamw8bit"}, gradnorm=True,
                            paper="Huang et al. 2024, GradNormLoRP"),
    "compact": Method("linear layers save x·Q instead of x for backward and hand the optimizer R = G·Q "
                      "(a seeded Gaussian Q, GaLore's update)", {"projector": "random", "side": "right"},
                      compact=True, paper="Shamshoum et al. 2024, CompAct"),
}


@hookimpl
def register_methods(register):
    for name, method in BUILTIN_METHODS.items():
        register(name, method)
