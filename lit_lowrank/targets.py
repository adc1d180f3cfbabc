"""Which weights a low-rank optimizer projects, chosen by what they are.

By default (``targets=None``) the projected weights are the matrices of the linear layers inside
the network's repeated blocks — the composite children of an ``nn.ModuleList``/``nn.ModuleDict``
(or an ``nn.Sequential`` repeating one block class): HF LLaMA's ``model.layers``, BERT's
``encoder.layer``, ``nn.Transformer``'s ``encoder.layers``/``decoder.layers``, a Meta-style
LLaMA's ``layers``. Linear layers are ``nn.Linear`` and its subclasses, anything with
``in_features``/``out_features`` and a 2-D ``weight`` (``QuantizedLinear``), HF's ``Conv1D``
(GPT-2); ``nn.MultiheadAttention`` contributes ``in_proj_weight`` (or ``q/k/v_proj_weight``).
A module's own 3-D parameters outside convolutions are stacked expert matrices (E×m×n, e.g.
transformers' ``MixtralExperts.gate_up_proj``/``down_proj``) and count as linear layers too.
Convolution kernels (``nn.Conv1d/2d/3d``) are projected only where ``targets`` names them
(as their out × (in·k…) matricization, or by a tensor projector); see
:mod:`lit_lowrank.optim.layouts`.

Never projected: embeddings (an ``nn.Embedding``'s weight, also where a head is tied to it), HF's
``get_output_embeddings()`` head, frozen weights (unless ``include_frozen``), and, by default,
linear layers outside the blocks (heads, poolers, classifiers). ``targets=[regex, ...]``
replaces "inside the blocks" by "module name matches" (``re.search``); ``exclude`` patterns
remove modules in both modes. Each parameter is chosen once, however many modules share it.
"""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn.utils import parametrize

_MHA_MATRICES = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
GRADNORM_DIRECTION = "parametrizations.weight.original1"
"""The name suffix of a weight-normalized weight's direction V (``apply_gradnorm``)."""


@dataclass(frozen=True)
class Choice:
    """One weight (≥ 2-D) of a model: projected (``reason is None``) or left dense.

    ``name`` is the parameter's qualified name, ``module`` the qualified name of the module that
    uses it (the one replaced or reparameterized by Q-GaLore / GradNormLoRP), ``layout`` how it
    is seen as matrices (``matrix``, ``experts``, ``kernel``; None: it cannot be)."""

    name: str
    module: str
    param: Tensor
    reason: str | None
    layout: str | None = None


def check_patterns(**patterns: Sequence[str] | None) -> None:
    """Raise a TypeError, naming the fix, for patterns that are not a collection of strings: a
    string (``targets="q_proj"`` would search each character's pattern), a one-shot iterator such
    as a generator (the patterns are read once per weight and again by each selection, so a
    second read would find none), or a non-string pattern. Any re-iterable collection of strings
    or compiled regexes (list, tuple, set) is accepted."""
    for key, value in patterns.items():
        if value is None:
            continue
        if isinstance(value, (str, bytes)):
            raise TypeError(f"{key}={value!r} is a string; pass a list of module-name patterns: {key}=[{value!r}]")
        if isinstance(value, Iterator):
            raise TypeError(f"{key} is a {type(value).__name__}, an iterator read only once (the selection reads "
                            f"the patterns several times); pass a list of module-name patterns: {key}=list(...)")
        if not isinstance(value, Iterable):
            raise TypeError(f"{key}={value!r} is not a collection of module-name patterns; pass a list of strings, "
                            f"e.g. {key}=['q_proj', 'v_proj']")
        odd = [pattern for pattern in value if not isinstance(pattern, (str, re.Pattern))]
        if odd:
            raise TypeError(f"{key} holds {odd!r}, not module-name patterns; pass strings (regexes searched in "
                            "module names), e.g. ['q_proj', 'v_proj']")


def select_targets(
    model: nn.Module,
    targets: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    *,
    include_frozen: bool = False,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split the trainable parameters (all, with ``include_frozen``) into ``(low_rank, dense)``,
    each ``{qualified name: param}``; see the module docstring for the rule.

    A parametrized weight (``torch.nn.utils.parametrize``) is represented by its original of the
    weight's shape: for GradNormLoRP's weight normalization that is the direction V, and the
    magnitude g is dense. Warns when a ``targets`` pattern matched a weight that stays dense
    (a conv kernel, an embedding, the output head).

    Raises:
        TypeError: if ``targets`` or ``exclude`` is not a collection of patterns (a string, a
            generator; see :func:`check_patterns`).
    """
    choices = classify(model, targets, exclude, include_frozen=include_frozen)
    low_rank = {c.name: c.param for c in choices if c.reason is None}
    chosen = {id(p) for p in low_rank.values()}
    dense = {n: p for n, p in model.named_parameters()
             if (include_frozen or p.requires_grad) and id(p) not in chosen}
    return low_rank, dense


def target_layouts(model: nn.Module, targets: Sequence[str] | None = None, exclude: Sequence[str] = (), *,
                   include_frozen: bool = False) -> dict[Tensor, str]:
    """The layout of each weight :func:`select_targets` projects, keyed by the parameter."""
    return {c.param: c.layout for c in classify(model, targets, exclude, include_frozen=include_frozen)
            if c.reason is None}


STRUCTURE = ("the trainable linear layers and stacked expert weights (3-D) inside repeated blocks (the composite "
             "children of an nn.ModuleList/ModuleDict, or of an nn.Sequential repeating one block class)")
"""What the structural selection (``targets=None``) projects, for messages."""


def no_targets_message(model: nn.Module, targets: Sequence[str] | None, exclude: Sequence[str]) -> str:
    """The error for a model where nothing would be projected (training would be plain AdamW):
    what the selection looks for, what the model has instead (by kind and reason, a few names
    each), and patterns of its candidates to pass as ``targets``."""
    name = type(model).__name__
    with warnings.catch_warnings():  # classify warned already, on the selection that found nothing
        warnings.simplefilter("ignore")
        choices = classify(model, targets, exclude)
    if targets is None:
        found = f"{name} has none of what the structural selection (targets=None) projects: {STRUCTURE}"
    else:
        found = (f"no trainable 2-D weight of {name} matches targets={list(targets)} "
                 "(nor a stacked expert weight or conv kernel)")
    excluding = f" (excluding {list(exclude)})" if exclude else ""
    patterns = _example_patterns(choices)
    fix = (f"to project some of them, set `targets` to module-name patterns (regexes searched in module names), "
           f"e.g. {patterns}" if patterns else "a low-rank optimizer has nothing to project here")
    return f"{found}{excluding}; it has {_inventory(choices)}. {fix[0].upper()}{fix[1:]}."


def _inventory(choices: list[Choice], shown: int = 3) -> str:
    """``choices`` grouped by what they are and why they stay dense: "2 conv kernels, projected
    only where `targets` names them (0.conv.weight, 1.conv.weight)"."""
    groups: dict[tuple[str, str], list[str]] = {}
    for choice in choices:
        groups.setdefault(_described(choice), []).append(choice.name)
    if not groups:
        return "no trainable weight of 2 or more dimensions"
    parts = []
    for (what, why), names in groups.items():
        listed = ", ".join(names[:shown]) + (", …" if len(names) > shown else "")
        parts.append(f"{len(names)} {_PLURALS.get(what, what + 's') if len(names) > 1 else what}{why} ({listed})")
    return "; ".join(parts)


_PLURALS = {"matrix": "matrices", "output head": "output heads"}


def _described(choice: Choice) -> tuple[str, str]:
    """``(what the weight is, why it stays dense)`` in words, for :func:`_inventory`."""
    reason = choice.reason or ""
    if reason in (_EMBEDDING, _HEAD):
        return reason, ""
    if reason == _KERNEL:
        return "conv kernel", ", projected only where `targets` names them"
    if reason == "not a linear layer":
        return "matrix", " outside a linear layer"
    if reason.endswith(_NOT_MATRIX):
        return f"{choice.param.ndim}-D weight", ""
    what = {"kernel": "conv kernel", "experts": "stacked expert weight"}.get(choice.layout, "matrix")
    return ("linear layer" if what == "matrix" and reason == "outside the blocks" else what), f" {reason}"


def _example_patterns(choices: list[Choice], most: int = 3) -> list[str]:
    """Module-name patterns of the weights that ``targets`` could project (those left dense
    only by where they are or by the patterns), at most ``most``."""
    patterns = []
    for choice in choices:
        if choice.layout is None or choice.reason in ("frozen", _EMBEDDING, _HEAD, "excluded by pattern"):
            continue
        if not choice.module:  # the model's own parameter: no module name to match
            continue
        words = [part for part in choice.module.split(".") if not part.isdigit()]  # "layers.0.0" → layers
        pattern = words[-1] if words else re.escape(choice.module)
        if pattern not in patterns:
            patterns.append(pattern)
    return patterns[:most]


def target_modules(model: nn.Module, targets: Sequence[str] | None = None, exclude: Sequence[str] = (),
                   ) -> dict[str, nn.Module]:
    """The modules whose weights :func:`select_targets` projects, by qualified name (the layers
    Q-GaLore quantizes and GradNormLoRP weight-normalizes)."""
    return {c.module: model.get_submodule(c.module)
            for c in classify(model, targets, exclude) if c.reason is None}


def linear_targets(model: nn.Module, targets: Sequence[str] | None, exclude: Sequence[str], transform: str,
                   accepts: Callable[[nn.Module], bool] = lambda module: isinstance(module, nn.Linear),
                   ) -> dict[str, nn.Module]:
    """:func:`target_modules` for a transform of linear layers (Q-GaLore's INT8 weights,
    GradNormLoRP's weight norm, CompAct's compressed layers); ``transform`` says what it does, for
    the message (``"weight_bits quantizes"``).

    Raises:
        ValueError: if there is no target (the run would silently go untransformed), or a target
            that ``accepts`` refuses (by default: one that is not an ``nn.Linear``).
    """
    chosen = target_modules(model, targets, exclude)
    if not chosen:
        raise ValueError(no_targets_message(model, targets, exclude))
    others = [f"{name} ({type(module).__name__})" for name, module in chosen.items() if not accepts(module)]
    if others:
        raise ValueError(f"{transform} nn.Linear layers only, not {others}; add them to `exclude`")
    refuse_tied_weights(model, chosen, transform)
    return chosen


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in ``model`` at the qualified ``name`` and at every other name of the module
    there, so that one module registered twice (a layer reused) stays one module."""
    old = model.get_submodule(name)
    paths = [path for path, current in model.named_modules(remove_duplicate=False) if current is old]
    for path in paths:
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, module)


def refuse_tied_weights(model: nn.Module, modules: dict[str, nn.Module], transform: str) -> None:
    """Raise if the ``weight`` of one of ``modules`` (by qualified name) is also registered
    elsewhere in ``model``: another module (tied weights) or another name of the same module.
    Transforming one use would silently untie it from the others. The same module registered
    under two names is one use; an already parametrized weight is skipped."""
    uses: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None:
                uses.setdefault(id(param), []).append((f"{module_name}.{attr}".lstrip("."), module, attr))
    for name, module in modules.items():
        weight = module._parameters.get("weight")
        if weight is None:
            continue
        others = sorted({path for path, owner, attr in uses[id(weight)] if owner is not module or attr != "weight"})
        if others:
            raise ValueError(f"{transform} {name}, whose weight is tied to {others}: transforming one use would untie "
                             f"them. Exclude it (exclude: ['^{re.escape(name)}$']; the shared weight then stays dense) "
                             "or untie the weights")


def classify(model: nn.Module, targets: Sequence[str] | None = None, exclude: Sequence[str] = (), *,
             include_frozen: bool = False) -> list[Choice]:
    """Every weight of ``model`` with ≥ 2 dimensions, once each, with why it stays dense."""
    check_patterns(targets=targets, exclude=exclude)
    names = {id(p): n for n, p in model.named_parameters()}
    uses: dict[int, list[tuple[str, Tensor, str]]] = {}  # a shared weight: every module using it
    for module_name, param, kind in _matrices(model):
        if id(param) in names:
            uses.setdefault(id(param), []).append((module_name, param, kind))
    rules = _Rules(repeated_blocks(model), _embeddings(model), _output_heads(model), targets, exclude, include_frozen)
    choices = []
    for (first, param, kind), *_ in uses.values():
        matched = [n for n, _, _ in uses[id(param)] if rules.matches(n)]
        module_name = matched[0] if matched else first
        layout = _LAYOUT_OF_KIND.get(kind, "matrix" if param.ndim == 2 else None)
        reason = rules.reason(param, module_name, kind, layout, bool(matched))
        if matched and reason is not None and (reason in (_EMBEDDING, _HEAD) or reason.endswith(_NOT_MATRIX)):
            warnings.warn(f"{module_name} matches targets={list(targets)} but stays dense ({reason}); "
                          "add it to `exclude` to silence this", stacklevel=3)
        choices.append(Choice(names[id(param)], module_name, param, reason, layout))
    return choices


_NOT_MATRIX, _EMBEDDING, _HEAD = ", not a matrix", "embedding", "output head"
_KERNEL = "a conv kernel (name it in targets to project it)"
_LAYOUT_OF_KIND = {"linear": "matrix", "experts": "experts", "kernel": "kernel"}
"""The layout of each kind of weight :func:`_matrices` finds; other 2-D weights are matrices."""


@dataclass(frozen=True)
class _Rules:
    """What decides a weight's fate: the model's blocks, embedding and head weights (by id),
    and the user's patterns."""

    blocks: set[str]
    embeddings: set[int]
    heads: set[int]
    targets: Sequence[str] | None
    exclude: Sequence[str]
    include_frozen: bool

    def matches(self, module_name: str) -> bool:
        return self.targets is not None and any(re.search(t, module_name) for t in self.targets)

    def reason(self, param: Tensor, module_name: str, kind: str, layout: str | None, matched: bool) -> str | None:
        """Why ``param`` (used by ``module_name``, a ``kind`` of weight) stays dense, or None to project it."""
        if not (param.requires_grad or self.include_frozen):
            return "frozen"
        if id(param) in self.embeddings:
            return _EMBEDDING
        if id(param) in self.heads:
            return _HEAD
        if any(re.search(x, module_name) for x in self.exclude):
            return "excluded by pattern"
        if self.targets is not None and not matched:
            return "not matched by targets"
        if layout is None:
            return f"{param.ndim}-D{_NOT_MATRIX}"
        if self.targets is not None:
            return None
        if kind == "kernel":
            return _KERNEL
        if kind not in ("linear", "experts"):
            return "not a linear layer"
        return None if _inside(module_name, self.blocks) else "outside the blocks"


def _matrices(model: nn.Module) -> Iterator[tuple[str, Tensor, str]]:
    """``(module name, weight, kind)`` for each module's weight of ≥ 2 dimensions; ``kind`` is
    ``linear``, ``experts`` (a module's own 3-D parameters), ``kernel`` (a convolution's) or
    ``other``."""
    conv1d = _hf_conv1d()
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            for attr in _MHA_MATRICES:
                if isinstance(getattr(module, attr, None), nn.Parameter):
                    yield name, getattr(module, attr), "linear"
            continue
        weight = _matrix(module)
        if isinstance(module, nn.modules.conv._ConvNd):
            yield name, weight, "kernel"
            continue
        if isinstance(weight, nn.Parameter) and weight.ndim >= 2:
            linear = (isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))
                      or (hasattr(module, "in_features") and hasattr(module, "out_features")))
            yield name, weight, "linear" if linear and weight.ndim == 2 else "other"
        for param in module.parameters(recurse=False):
            if param.ndim == 3 and param is not weight:
                yield name, param, "experts"


def _matrix(module: nn.Module) -> Tensor | None:
    """The matrix a module trains: ``weight``, or the one original of a parametrized ``weight``
    that has the weight's shape."""
    if not parametrize.is_parametrized(module, "weight"):
        return getattr(module, "weight", None)
    originals = module.parametrizations.weight
    shape = module.weight.shape
    same = [(n, p) for n, p in originals.named_parameters(recurse=False) if p.shape == shape]
    if len(same) != 1:
        raise ValueError(
            f"cannot tell which of {[n for n, _ in same]} of a parametrized weight {tuple(shape)} "
            "to project; pass its module to `exclude`, or parametrize with one original of the "
            "weight's shape (as torch.nn.utils.parametrizations.weight_norm does)."
        )
    return same[0][1]


def repeated_blocks(model: nn.Module) -> set[str]:
    """Qualified names of the repeated blocks: composite children of ``ModuleList``/``ModuleDict``
    containers, and of ``Sequential`` containers holding ≥ 2 composite children of one class."""
    blocks = set()
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
            continue
        if isinstance(module, parametrize.ParametrizationList) or name.endswith("parametrizations"):
            continue
        composite = {key: child for key, child in module.named_children() if any(True for _ in child.children())}
        if isinstance(module, nn.Sequential):  # a pipeline: only the classes it repeats are blocks
            kinds = [type(child) for child in composite.values()]
            composite = {key: child for key, child in composite.items() if kinds.count(type(child)) >= 2}
        blocks.update(f"{name}.{key}" if name else key for key in composite)
    return blocks


def _inside(module_name: str, blocks: set[str]) -> bool:
    parts = module_name.split(".")
    return any(".".join(parts[:i]) in blocks for i in range(1, len(parts)))


def _embeddings(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}


def _output_heads(model: nn.Module) -> set[int]:
    """Ids of HF ``get_output_embeddings()`` weights (the LM head) anywhere in ``model``."""
    heads = set()
    for module in model.modules():
        getter = getattr(module, "get_output_embeddings", None)
        if not callable(getter):
            continue
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            continue
        if isinstance(getattr(head, "weight", None), nn.Parameter):
            heads.add(id(head.weight))
    return heads


def _hf_conv1d() -> type | None:
    """``transformers.pytorch_utils.Conv1D`` (GPT-2's linear layer, weight in×out) if transformers
    is loaded; never imports it."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)
