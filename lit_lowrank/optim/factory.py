"""``build_optimizer``: the one function every integration (Lightning, HF Trainer, plain loops)
calls to turn a model into a :class:`LowRankOptimizer`."""

from __future__ import annotations

import re
from typing import Any, Sequence

from torch import Tensor, nn

from lit_lowrank.optim.lowrank import LowRankOptimizer

DEFAULT_TARGETS = ("attn", "attention", "mlp", "intermediate", "output")
"""Module-name patterns of the weights GaLore projects: attention and MLP linear layers
(LLaMA ``self_attn``/``mlp``; BERT ``attention``/``intermediate``/``output``)."""

DEFAULT_EXCLUDE = ("embed", "lm_head", "classifier", "pooler")


def select_targets(
    model: nn.Module,
    targets: Sequence[str] = DEFAULT_TARGETS,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split trainable parameters into ``(low_rank, dense)``, each ``{qualified name: param}``.

    A parameter is low-rank iff it is the 2-D ``weight`` of a module whose qualified name
    matches one of ``targets`` (``re.search``) and none of ``exclude``. Everything else —
    embeddings, norms, biases, heads — is dense.
    """
    low_rank: dict[str, Tensor] = {}
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (
            isinstance(weight, nn.Parameter)
            and weight.requires_grad
            and weight.ndim == 2
            and any(re.search(t, module_name) for t in targets)
            and not any(re.search(x, module_name) for x in exclude)
        ):
            low_rank[f"{module_name}.weight" if module_name else "weight"] = weight
    chosen = {id(p) for p in low_rank.values()}
    dense = {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in chosen}
    return low_rank, dense


def build_optimizer(
    model: nn.Module,
    *,
    targets: Sequence[str] = DEFAULT_TARGETS,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    **options: Any,
) -> LowRankOptimizer:
    """A :class:`LowRankOptimizer` over ``model``: target weights in a ``lowrank=True`` group,
    the rest in a dense AdamW group. ``options`` are ``LowRankOptimizer``'s keyword arguments.

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
    return LowRankOptimizer(groups, **options)
