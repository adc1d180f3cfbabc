"""What a user wrote on :class:`~lit_lowrank.lightning.LowRankCallback` or a ``lowrank`` strategy —
a :class:`LowRankConfig` and keyword options — merged into the one config of the run, with the
fields chosen for it (resolved through :func:`lit_lowrank.optim.resolution.resolve`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from lit_lowrank.lightning.config import LowRankConfig
from lit_lowrank.optim.resolution import resolve
from lit_lowrank.options import having

OWNED_BY_MODULE = (*having("user"), "warmup", "min_lr_ratio", "lr_schedule")
"""LowRankConfig fields an existing module's ``configure_optimizers`` owns (its optimizer and
scheduler set them); setting them on the callback or strategy is an error."""


def adoption_config(config: LowRankConfig | None, options: dict[str, Any]) -> tuple[LowRankConfig, frozenset[str]]:
    """The merged config of a callback/strategy and the fields chosen for the run: every keyword
    in ``options``, every field of ``config`` that differs from its default, and every field the
    config's ``method`` sets (a method's inner optimizer replaces the converted one, as
    ``inner=`` written out does).

    Raises:
        ValueError: if a field of :data:`OWNED_BY_MODULE` is chosen.
    """
    base = vars(config) if config is not None else {}
    merged = LowRankConfig(**{**base, **options})
    default = LowRankConfig()
    changed = {f.name for f in dataclasses.fields(LowRankConfig)
               if base and _plain(base[f.name]) != _plain(getattr(default, f.name))}
    explicit = frozenset(changed | set(options))
    owned = sorted(explicit & set(OWNED_BY_MODULE))
    if owned:
        raise ValueError(f"{owned} set on the low-rank callback/strategy, but an existing module's "
                         "configure_optimizers owns them: set lr, betas, eps and weight_decay on your torch optimizer "
                         "and the LR schedule with your own scheduler (or train with LowRankModule, which reads "
                         "them from the config)")
    return merged, explicit | resolve(merged.method, {}).chosen


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value  # YAML gives lists for tuple fields
