"""``build_optimizer``: the one function every integration (Lightning, HF Trainer, plain loops)
calls to turn a model into a :class:`LowRankOptimizer`."""

from __future__ import annotations

import re
from typing import Any, Sequence

from torch import Tensor, nn
from torch.nn.utils import parametrize

from lit_lowrank.optim.lowrank import LowRankOptimizer

DEFAULT_TARGETS = ("attn", "attention", "mlp", "intermediate", "output")
"""Module-name patterns of the weights GaLore projects: attention and MLP linear layers
(LLaMA ``self_attn``/``mlp``; BERT ``attention``/``intermediate``/``output``)."""

DEFAULT_EXCLUDE = ("embed", "lm_head", "classifier", "pooler")


def select_targets(
    model: nn.Module,
    targets: Sequence[str] = DEFAULT_TARGETS,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    include_frozen: bool = False,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split trainable parameters into ``(low_rank, dense)``, each ``{qualified name: param}``.

    A parameter is low-rank iff it is the 2-D ``weight`` of a module whose qualified name
    matches one of ``targets`` (``re.search``) and none of ``exclude``. Everything else —
    embeddings, norms, biases, heads — is dense. A parametrized weight
    (``torch.nn.utils.parametrize``) is represented by its original of the weight's shape: for
    GradNormLoRP's weight normalization that is the direction V, and the magnitude g is dense.
    Frozen parameters (``requires_grad=False``) are left out unless ``include_frozen``.
    """
    low_rank: dict[str, Tensor] = {}
    for module_name, module in model.named_modules():
        if not any(re.search(t, module_name) for t in targets) or any(re.search(x, module_name) for x in exclude):
            continue
        name, weight = _matrix(module)
        if isinstance(weight, nn.Parameter) and (weight.requires_grad or include_frozen) and weight.ndim == 2:
            low_rank[f"{module_name}.{name}" if module_name else name] = weight
    chosen = {id(p) for p in low_rank.values()}
    dense = {n: p for n, p in model.named_parameters() if (p.requires_grad or include_frozen) and id(p) not in chosen}
    return low_rank, dense


def _matrix(module: nn.Module) -> tuple[str, Tensor | None]:
    """``(name, parameter)`` of the matrix a module trains: ``weight``, or the one original of a
    parametrized ``weight`` that has the weight's shape."""
    if not parametrize.is_parametrized(module, "weight"):
        return "weight", getattr(module, "weight", None)
    originals = module.parametrizations.weight
    shape = module.weight.shape
    same = [(n, p) for n, p in originals.named_parameters(recurse=False) if p.shape == shape]
    if len(same) != 1:
        raise ValueError(
            f"cannot tell which of {[n for n, _ in same]} of a parametrized weight {tuple(shape)} "
            "to project; pass its module to `exclude`, or parametrize with one original of the "
            "weight's shape (as torch.nn.utils.parametrizations.weight_norm does)."
        )
    return f"parametrizations.weight.{same[0][0]}", same[0][1]


def build_optimizer(
    model: nn.Module,
    *,
    targets: Sequence[str] = DEFAULT_TARGETS,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    **options: Any,
) -> LowRankOptimizer:
    """A :class:`LowRankOptimizer` over ``model``: target weights in a ``lowrank=True`` group,
    the rest in a dense AdamW group. ``options`` are ``LowRankOptimizer``'s keyword arguments.
    Frozen target weights unfrozen later and added with ``add_param_group`` (Lightning's
    ``BaseFinetuning``) are projected too: the optimizer's ``is_target`` knows every target.

    Raises:
        ValueError: if no parameter matches ``targets`` (training would silently be plain AdamW).
    """
    low_rank, dense = select_targets(model, targets, exclude)
    if not low_rank:
        raise ValueError(
            f"no 2-D weight matches targets={list(targets)} (excluding {list(exclude)}); "
            "set `targets` to module-name patterns of your model's linear layers, "
            "e.g. ['q_proj', 'v_proj']."
        )
    groups = [{"params": list(low_rank.values()), "names": list(low_rank), "lowrank": True}]
    if dense:
        groups.append({"params": list(dense.values()), "names": list(dense), "lowrank": False})
    targets_incl_frozen = frozenset(select_targets(model, targets, exclude, include_frozen=True)[0].values())
    return LowRankOptimizer(groups, is_target=targets_incl_frozen.__contains__, **options)
