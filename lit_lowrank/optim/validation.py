"""What :class:`~lit_lowrank.LowRankOptimizer` checks so that it never trains something other than
asked: a param group's options when the optimizer is built (values, registered names, and a probe
of each component built from its ``*_args``), and the bases a projector returns at each refresh.

Errors name the option or the component (with the plugin that provides it) and say what to set.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Mapping

import torch
from torch import Tensor

from lit_lowrank import plugins
from lit_lowrank.options import component_kinds
from lit_lowrank.optim.guard import (
    MAX_CONSECUTIVE_SKIPS, check_max_consecutive_skips, check_nonfinite_option, first_nonfinite,
)
from lit_lowrank.optim.sharding import RowShard, applies_bases_plainly
from lit_lowrank.projectors.base import SIDE_POLICIES, Projector, Side
from lit_lowrank.quantizers.base import QuantizerProbeError
from lit_lowrank.transforms.base import stored_weight

ON_REFRESH = ("keep", "reset", "rotate")
"""What happens to the moments when a basis changes (see ``LowRankOptimizer._after_refresh``)."""

COMPONENTS = component_kinds()
"""Group option naming a component → its registry kind; its keyword arguments are ``<option>_args``."""


def check_group(group: Mapping[str, Any]) -> None:
    """Validate a param group's options (or a config's): AdamW's ``lr``, ``betas``, ``eps``,
    ``weight_decay``, ``nonfinite`` and ``max_consecutive_skips`` for every group; for ``lowrank``
    groups also ``rank``, ``update_gap``, ``scale``, ``side``, ``on_refresh``, ``projector_seed``, and a probe of each
    component built from its name and ``*_args`` (so typos and unknown names fail now, not at the
    first step).

    Raises:
        TypeError: an option of the wrong type, or a keyword a component does not take.
        ValueError: an option out of range, or a component rejecting its arguments.
        lit_lowrank.UnknownComponentError: a name that is not registered.
    """
    check_adamw_options(group)
    check_nonfinite_option(group.get("nonfinite", "skip"))
    check_max_consecutive_skips(group.get("max_consecutive_skips", MAX_CONSECUTIVE_SKIPS))
    if group.get("lowrank"):
        check_lowrank_options(group)
        probe_components(group)


def check_sharding(group: Mapping[str, Any]) -> dict[Tensor, RowShard]:
    """The row shards (:class:`~lit_lowrank.optim.sharding.RowShard`) of the group's parameters
    that FSDP2 split across ranks, after refusing what a rank cannot step on its rows alone
    (it would silently train another method): a projector that does not apply its bases as the
    base class does (Tucker); a rule that does not declare
    ``shardable`` (its norms would cover one rank's rows); an inner optimizer that is not
    ``elementwise`` (Adafactor's factored and 8-bit Adam's block statistics span the ranks);
    rotating two-sided moments; quantized weights. FSDP1 flat parameters and tensor parallelism raise in
    :meth:`RowShard.of`."""
    shards = {p: shard for p in group["params"] if (shard := RowShard.of(p)) is not None}
    if not shards:
        return shards
    if not group["lowrank"]:
        if plugins.get_inner_optimizer(group["inner"]).steps_dense:
            require_flag(group, "inner", "elementwise")
        return shards
    check_shardable(group)
    if any(stored_weight(p) is not None for p in group["params"]):
        raise ValueError("quantized weights (transform int-weights) cannot be sharded by FSDP; drop int-weights from "
                         "lowrank.transforms or use DDP.")
    return shards


def check_shardable(group: Mapping[str, Any]) -> None:
    """Refuse the components of a low-rank group (or a config) that cannot step one rank's rows
    of an FSDP-sharded weight (see :func:`check_sharding`)."""
    if not applies_bases_plainly(plugins.get_projector(group["projector"])):
        raise ValueError(f"{describe('projectors', group['projector'])} does not project with plain bases, so it "
                         "cannot be applied to one rank's rows of a weight sharded by FSDP; choose one of "
                         f"{[name for name in plugins.registered('projectors') if applies_bases_plainly(plugins.get_projector(name))]}.")
    require_flag(group, "rule", "shardable")
    require_flag(group, "inner", "elementwise")
    if group["side"] == "full" and group["on_refresh"] == "rotate":
        raise ValueError("on_refresh: rotate with side: full would mix the columns of R that different ranks keep "
                         "moments for, on weights sharded by FSDP; use on_refresh keep or reset, or a one-sided side.")


def require_flag(group: Mapping[str, Any], option: str, flag: str) -> None:
    """Refuse the group's ``option`` component unless its class sets ``flag``, naming those that do."""
    kind = COMPONENTS[option]
    if not getattr(plugins.get(kind, group[option]), flag, False):
        why = {"shardable": "its norms would cover one rank's rows only",
               "elementwise": "its statistics span rows or columns that other ranks hold"}[flag]
        raise ValueError(f"weights sharded by FSDP need a {flag} {option}, and {describe(kind, group[option])} is "
                         f"not ({why}); set {option} to one of {declaring(kind, flag)}, or train with DDP "
                         "(strategy 'ddp_lowrank').")


def check_adamw_options(group: Mapping[str, Any]) -> None:
    """``lr`` finite ≥ 0, ``betas`` two numbers in [0, 1), ``eps`` finite > 0, ``weight_decay``
    finite ≥ 0; ``betas`` and ``eps`` may be None (the inner optimizer's own defaults)."""
    lr = real("lr", group["lr"])
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite number >= 0, got {lr}; set the peak learning rate, e.g. 1e-3")
    betas = group["betas"]
    if betas is not None and (not isinstance(betas, (tuple, list)) or len(betas) != 2):
        raise TypeError(f"betas must be two numbers, got {betas!r}; e.g. betas: [0.9, 0.999]")
    for beta in betas or ():
        if not 0 <= real("betas", beta) < 1:
            raise ValueError(f"betas must each be in [0, 1), got {list(betas)}; e.g. betas: [0.9, 0.999] "
                             "(a beta >= 1 makes the moments grow without bound)")
    eps = real("eps", group["eps"]) if group["eps"] is not None else 1.0
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps}; e.g. eps: 1e-8")
    decay = real("weight_decay", group["weight_decay"])
    if not (math.isfinite(decay) and decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {decay}; use 0 for none")


def check_lowrank_options(group: Mapping[str, Any]) -> None:
    """``rank`` and ``update_gap`` integers ≥ 1, ``scale`` finite > 0, ``side`` and
    ``on_refresh`` known, ``projector_seed`` an integer in [0, 2³¹), component names strings and ``*_args``
    mappings."""
    for key, meaning in (("rank", "the subspace rank r, e.g. 128"),
                         ("update_gap", "steps between subspace refreshes, e.g. 200")):
        value = group[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{key} must be an integer, got {value!r} ({type(value).__name__}); it is {meaning}")
        if value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}; it is {meaning}")
    scale = real("scale", group["scale"])
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale (α, the update scale) must be a finite number > 0, got {scale}; GaLore uses 0.25")
    if group["side"] not in SIDE_POLICIES:
        raise ValueError(f"side={group['side']!r}; expected one of {SIDE_POLICIES}")
    if group["on_refresh"] not in ON_REFRESH:
        raise ValueError(f"on_refresh={group['on_refresh']!r}; expected one of {ON_REFRESH}")
    check_projector_seed(group.get("projector_seed", 0))
    for option in COMPONENTS:
        if not isinstance(group[option], str):
            raise TypeError(f"{option} must be a registered name (a string), got {group[option]!r}; "
                            "`python -m lit_lowrank plugins` lists them")
        if not isinstance(group[f"{option}_args"], Mapping):
            raise TypeError(f"{option}_args must be a mapping of keyword arguments, got {group[f'{option}_args']!r}")


MAX_PROJECTOR_SEED = 2**31
"""``projector_seed`` stays below it: index + seed · 2³² fits the int64 a checkpoint stores."""


def check_projector_seed(seed: Any) -> None:
    """``projector_seed`` an integer in [0, 2³¹) (see :data:`lit_lowrank.options.SEED_STRIDE`)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"projector_seed must be an integer, got {seed!r} ({type(seed).__name__}); it picks the "
                        "random projections' draws (0: the default draws)")
    if not 0 <= seed < MAX_PROJECTOR_SEED:
        raise ValueError(f"projector_seed must be in [0, 2**31), got {seed}; use another such integer per run")


def probe_components(group: Mapping[str, Any]) -> None:
    """Build each component of a low-rank group once, as the optimizer will (the projector at
    the group's rank; seed 0), so that its own argument checks and those of the quantizers it
    builds run now; a rule that works at one rank only (``UpdateRule.required_rank``) refuses
    another."""
    build("projector", group, rank=group["rank"], side=group["side"], seed=0)
    build("schedule", group, gap=group["update_gap"])
    rule = build_rule(group, build_inner(group))
    if rule.required_rank is not None and group["rank"] != rule.required_rank:
        raise ValueError(f"{describe('update_rules', group['rule'])} works at rank {rule.required_rank} only, but "
                         f"rank is {group['rank']}; set rank: {rule.required_rank}, or choose another rule")


def build_inner(group: Mapping[str, Any]) -> Any:
    """The group's inner optimizer, offered the group's ``betas`` and ``eps`` only where set (not
    None): an inner optimizer keeps its own defaults otherwise (Lion's betas (0.9, 0.99), HF
    AdamW's eps 1e-6)."""
    offered = {key: tuple(group[key]) if key == "betas" else group[key]
               for key in ("betas", "eps") if group[key] is not None}
    return build("inner", group, **offered)


def build_rule(group: Mapping[str, Any], inner: Any) -> Any:
    """The group's update rule, offered ``scale`` (α) and the ``betas``/``eps`` of the group's
    inner optimizer ``inner`` as it resolved them (the user's where set, else its defaults), for
    a rule with moments of its own (SNSM's subset norms): one pair of values for both."""
    resolved = {key: getattr(inner, key) for key in ("betas", "eps") if getattr(inner, key, None) is not None}
    return build("rule", group, scale=group["scale"], **resolved)


def build(option: str, group: Mapping[str, Any], **offered: Any) -> Any:
    """The component that ``group[option]`` names, built with ``group[option + "_args"]`` and
    those of ``offered`` it accepts. Errors are re-raised (same type) naming the component, its
    provider and the option to fix."""
    kind, name = COMPONENTS[option], group[option]
    cls = plugins.get(kind, name)
    explicit = group[f"{option}_args"]
    try:
        return construct(cls, with_quantizer_class(explicit), **offered)
    except QuantizerProbeError as exc:
        quantizers = plugins.registered("quantizers")
        quantizer = explicit.get("quantizer", exc.name)
        provider = quantizers[quantizer].provider if quantizer in quantizers else None
        raise QuantizerProbeError(quantizer, exc.problem, provider=provider, fix=(
            f"; fix or uninstall that plugin, or set another quantizer in {option}_args "
            f"(registered: {', '.join(sorted(quantizers))})")) from exc
    except (plugins.UnknownComponentError, TypeError, ValueError) as exc:
        base = next(t for t in (plugins.UnknownComponentError, TypeError, ValueError) if isinstance(exc, t))
        raise base(f"{describe(kind, name)}: {exc} (check {option}_args)") from exc


def with_quantizer_class(args: Mapping[str, Any]) -> Mapping[str, Any]:
    """``args`` with a registered quantizer name (``quantizer: int``) replaced by its class:
    components take classes and never look the registry up themselves."""
    if not isinstance(args.get("quantizer"), str):
        return args
    return {**args, "quantizer": plugins.get_quantizer(args["quantizer"])}


def describe(kind: str, name: str) -> str:
    """``projector 'svd' (from lit_lowrank.projectors.svd)``: a component and its provider."""
    entry = plugins.registered(kind).get(name)
    provider = f" (from {entry.provider})" if entry is not None else ""
    return f"{kind[:-1].replace('_', ' ')} {name!r}{provider}"


def construct(cls: type, explicit: Mapping[str, Any], **offered: Any) -> Any:
    """``cls(**offered, **explicit)``, offering only the keywords ``cls`` accepts (following
    ``**kwargs`` into its base classes' constructors); an unknown
    explicit keyword raises a TypeError naming what ``cls`` accepts (for a ``**kwargs``
    constructor, also what its base classes' constructors accept)."""
    parameters = inspect.signature(cls).parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    kwargs = {k: v for k, v in offered.items() if k in accepted(cls)}
    unknown = [k for k in explicit if not var_kw and k not in parameters]
    if unknown:
        raise TypeError(f"{cls.__name__} got unknown option(s) {unknown}; it accepts: {', '.join(accepted(cls))}")
    try:
        return cls(**{**kwargs, **explicit})
    except TypeError as exc:
        if not var_kw or "unexpected keyword" not in str(exc):
            raise
        raise TypeError(f"{cls.__name__}: {exc}; it accepts: {', '.join(accepted(cls))}") from exc


def accepted(cls: type) -> list[str]:
    """The keyword arguments ``cls(...)`` takes, following ``**kwargs`` into base classes."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        parameters = inspect.signature(klass.__init__).parameters.values()
        names += [p.name for p in parameters if p.name != "self" and p.name not in names
                  and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return names


def check_batched(group: Mapping[str, Any]) -> None:
    """Refuse stacked experts (the ``experts`` layout) for a group whose projector, rule or
    inner optimizer does not declare ``batched`` (each would treat the stack as one tensor),
    or whose projector stores quantized bases (Q-GaLore's INT4 bases are 2-D only)."""
    for option in ("projector", "rule", "inner"):
        kind = COMPONENTS[option]
        if not plugins.get(kind, group[option]).batched:
            raise ValueError(f"stacked expert weights (layout: experts) need a batched {option}, and "
                             f"{describe(kind, group[option])} is not; set {option} to one of "
                             f"{declaring(kind, 'batched')}, or exclude the experts from `targets`.")
    if group["projector_args"].get("quantizer") is not None:
        raise ValueError("quantized projector bases (projector_args.quantizer) take 2-D weights; stacked expert "
                         "weights (layout: experts) keep float bases: exclude the experts from `targets`, or drop "
                         "the quantizer.")


def declaring(kind: str, flag: str) -> list[str]:
    """The registered components of ``kind`` whose class sets ``flag`` (``batched``, ...)."""
    return [name for name in plugins.registered(kind) if getattr(plugins.get(kind, name), flag, False)]


def check_bases(projector: Projector, grad: Tensor, rank: int, name: str) -> None:
    """After a refresh on ``grad`` (m×n, or E×m×n): the projector's bases must be L m×r' (left
    side) and/or Q n×r' (right side; E× each for a stack), as its ``side`` says, with
    1 ≤ r' ≤ min(``rank``, m, n), and finite; a tensor projector's one basis per mode
    d_k×r_k with 1 ≤ r_k ≤ min(``rank``, d_k). ``name`` is the projector's registered name (for
    the message)."""
    if projector.projects_tensors:
        batch, wanted, labels = (), tuple(grad.shape), [f"U{k + 1}" for k in range(grad.ndim)]
        expected = "one d_k×r_k basis per mode"
    else:
        *batch, m, n = grad.shape
        wanted = {Side.LEFT: (m, None), Side.RIGHT: (None, n), Side.BOTH: (m, n)}[projector.side]
        labels, expected = ("L", "Q"), "L m×r' and/or Q n×r'"
        rank = min(rank, m, n)
    bases = projector.bases()
    shape = "×".join(map(str, grad.shape))
    if len(bases) != len(wanted):
        raise RuntimeError(f"{describe('projectors', name)} returned {len(bases)} bases for a {shape} gradient; "
                           f"a projector must return {expected}. Fix or uninstall that plugin, or set another projector.")
    for label, basis, rows in zip(labels, bases, wanted):
        problem = basis_problem(basis, rows, rank if rows is None else min(rank, rows), tuple(batch))
        if problem and not torch.isfinite(grad).all():
            raise RuntimeError(f"a subspace refresh got a gradient with NaN or inf values ({shape}), so its "
                               f"basis {label} has {problem}; find where the loss or gradient overflows "
                               "(lower lr, use bf16 rather than fp16, clip gradients)")
        if problem:
            raise RuntimeError(
                f"{describe('projectors', name)} returned {problem} as its basis {label} for a {shape} gradient "
                f"(side {projector.side.name}, rank {rank}); a projector must return {expected} "
                f"with 1 ≤ r' ≤ rank. Fix or uninstall that plugin, or set another projector.")


def check_tensor_projector(group: Mapping[str, Any]) -> None:
    """Refuse, for a projector that projects tensors (Tucker: a core, no sides), a rule that
    reads channels of one-sided projections (``UpdateRule.any_projection`` False: Fira, APOLLO),
    an inner optimizer that is not elementwise (``batched`` False), and ``on_refresh: rotate``
    (its maps are defined for the L/Q pair)."""
    name = group["projector"]
    if not plugins.get_update_rule(group["rule"]).any_projection:
        raise ValueError(f"{describe('projectors', name)} projects tensors (no one-sided projection), and "
                         f"{describe('update_rules', group['rule'])} needs one; set rule to one of "
                         f"{declaring('update_rules', 'any_projection')}.")
    if not plugins.get_inner_optimizer(group["inner"]).batched:
        raise ValueError(f"{describe('projectors', name)} projects tensors, and "
                         f"{describe('inner_optimizers', group['inner'])} keeps statistics per row/column of a "
                         f"matrix; set inner to one of {declaring('inner_optimizers', 'batched')}.")
    if group["on_refresh"] == "rotate":
        raise ValueError(f"on_refresh: rotate maps moments between L/Q bases and {describe('projectors', name)} "
                         "has one basis per mode; use on_refresh keep or reset.")


def basis_problem(basis: Tensor | None, rows: int | None, rank: int, batch: tuple[int, ...] = ()) -> str | None:
    """What is wrong with one basis (None if nothing): presence, shape (rows×r', r' ≤ rank, one
    per slice of a ``batch`` or shared by it), finiteness."""
    if rows is None:
        return None if basis is None else f"a {tuple(basis.shape)} tensor where none belongs"
    if basis is None:
        return "None"
    if basis.ndim < 2 or basis.shape[:-2] not in (batch, ()) or basis.shape[-2] != rows or not 1 <= basis.shape[-1] <= rank:
        return f"a {tuple(basis.shape)} tensor"
    if first_nonfinite([basis]) is not None:
        return "non-finite values (NaN or inf)"
    return None


def real(key: str, value: Any) -> float:
    """``value`` as a float if it is a real number (or a one-element tensor), else a TypeError."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{key} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)
