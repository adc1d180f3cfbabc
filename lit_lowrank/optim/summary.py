"""What a :class:`LowRankOptimizer` will do to a model, before its first step: each projected
weight (shape, rank after clamping, projected side), each weight matrix left dense and why, and
the predicted optimizer-state bytes against full-rank AdamW's ``2 · numel · element size``.

The low-rank state is predicted by building each weight's inner optimizer and projector on the
``meta`` device (no memory, no SVD) and counting their tensors, as
:meth:`LowRankOptimizer.state_bytes` counts the real ones; a projector that cannot run on
``meta`` (e.g. one choosing its rank from the spectrum) is counted as unknown. State an update
rule makes at its first step (SNSM's subset norms, Fira's and APOLLO's limiter norm per expert
of a stack) is not predicted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from lit_lowrank.optim.layouts import View
from lit_lowrank.optim.lowrank import LowRankOptimizer, tensor_bytes
from lit_lowrank.optim.targets import classify
from lit_lowrank.optim.validation import build, build_inner
from lit_lowrank.plugins import get_projector
from lit_lowrank.projectors.base import choose_side


@dataclass(frozen=True)
class Row:
    """One weight matrix: projected (``rank``/``side`` set, ``reason`` None) or dense (``reason``)."""

    name: str
    shape: tuple[int, ...]
    rank: int | None = None
    side: str | None = None
    state_bytes: int | None = None
    reason: str | None = None


@dataclass(frozen=True)
class LowRankSummary:
    rows: list[Row]
    state_bytes: int | None
    """Predicted optimizer state (low-rank moments, projectors, dense AdamW moments); None if unknown."""
    adamw_bytes: int
    """Full-rank AdamW's two moments for every parameter in the optimizer."""

    def __str__(self) -> str:
        header = ("Name", "Shape", "Rank", "Side", "State")
        lines = [(r.name, "×".join(map(str, r.shape)), str(r.rank) if r.rank else "-", r.side or "dense",
                  _size(r.state_bytes) if r.reason is None else r.reason) for r in self.rows]
        widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
        table = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in [header, *lines]]
        table.insert(1, "-" * len(table[0]))
        projected = sum(r.reason is None for r in self.rows)
        ratio = f" ({self.state_bytes / self.adamw_bytes:.1%})" if self.state_bytes and self.adamw_bytes else ""
        table.append(f"{projected} weights projected, {len(self.rows) - projected} weight matrices dense")
        table.append(f"Optimizer state (predicted): {_size(self.state_bytes)}{ratio} "
                     f"vs AdamW {_size(self.adamw_bytes)}")
        return "\n".join(table)


def summarize(model: nn.Module, optimizer: LowRankOptimizer, targets: Sequence[str] | None = None,
              exclude: Sequence[str] = ()) -> LowRankSummary:
    """The summary of ``optimizer`` over ``model``; ``targets``/``exclude`` are those the
    optimizer was built with (they give the dense weights' reasons)."""
    names = {id(p): n for n, p in model.named_parameters()}
    rows, dense_bytes, adamw = [], 0, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            adamw += 2 * p.numel() * p.element_size()
            if group["lowrank"]:
                rows.append(_projected_row(names.get(id(p), "unnamed"), p, group))
            else:
                dense_bytes += 2 * p.numel() * p.element_size()
    lowrank_bytes = [row.state_bytes for row in rows]
    total = None if None in lowrank_bytes else dense_bytes + sum(lowrank_bytes)
    projected = {id(p) for group in optimizer.param_groups if group["lowrank"] for p in group["params"]}
    for choice in classify(model, targets, exclude):
        if id(choice.param) not in projected:
            reason = choice.reason or "not in the optimizer"
            rows.append(Row(choice.name, tuple(choice.param.shape), reason=reason))
    return LowRankSummary(rows, total, adamw)


def _projected_row(name: str, p: Tensor, group: dict) -> Row:
    tensors = get_projector(group["projector"]).projects_tensors
    view = View.of(p, group.get("layout", "matrix"), tensors)
    rank = group["rank"] if tensors else min(group["rank"], *view.matrix)
    side = "modes" if tensors else choose_side(group["side"], view.matrix).name.lower()
    projector = build("projector", group, rank=rank, side=group["side"], seed=0)
    grad = torch.empty(view.shape, dtype=p.dtype, device="meta")
    try:
        projector.refresh(grad)
        moments = build_inner(group).init_state(projector.project(grad))  # R's shape, from the projector
        state = tensor_bytes(moments) + projector.resident_bytes()
    except Exception:  # noqa: BLE001 — a component that needs real values (a spectrum's .item()): unknown
        state = None
    return Row(name, tuple(p.shape), rank, side, state)


def _size(nbytes: int | None) -> str:
    """Bytes for a reader: ``"unknown"``, ``"512 B"``, ``"1.5 KB"`` ... ``"GB"``."""
    if nbytes is None:
        return "unknown"
    if nbytes < 1024:
        return f"{nbytes} B"
    exponent = min(3, int(math.log(nbytes, 1024)))
    return f"{nbytes / 1024**exponent:.1f} {('KB', 'MB', 'GB')[exponent - 1]}"
