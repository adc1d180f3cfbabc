"""What a :class:`LowRankOptimizer` will do to a model, before its first step: each projected
weight (shape, rank after clamping, projected side), each weight matrix left dense and why, and
the predicted optimizer-state bytes against full-rank AdamW's ``2 · numel · element size``.

The state is predicted from the components themselves, for any registered ones: each weight's
projector is built and refreshed with a gradient on the ``meta`` device (no memory, no SVD),
and :meth:`LowRankOptimizer.state_bytes`'s roles are counted on what it gives —
``inner.init_state(R)`` and the rule's :meth:`~lit_lowrank.UpdateRule.state_layout` (moments),
``projector.resident_bytes()`` (projectors), the dense groups' fresh state (dense). A projector
or rule that cannot run on ``meta`` (one choosing its rank from the spectrum) makes the
prediction unknown. The memory estimator (:mod:`lit_lowrank.memory`) uses the same prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from lit_lowrank.optim.layouts import View
from lit_lowrank.optim.lowrank import LowRankOptimizer, tensor_bytes
from lit_lowrank.targets import classify
from lit_lowrank.optim.validation import build
from lit_lowrank.plugins import get_projector
from lit_lowrank.projectors.base import choose_side


@dataclass(frozen=True)
class WeightBytes:
    """The predicted bytes of one projected weight."""

    moments: int
    """What ``state_bytes()`` counts as its moments: the inner optimizer's state and the rule's."""
    projector: int
    """What its projector keeps resident (``resident_bytes``)."""
    low: int
    """Its projected gradient ``R`` (what CompAct's layers hand over instead of ``G``)."""


@dataclass(frozen=True)
class Row:
    """One weight matrix: projected (``rank``/``side`` set, ``reason`` None) or dense (``reason``).
    A projected row's ``predicted`` bytes are None where its components cannot run on ``meta``
    (``unknown`` says why)."""

    name: str
    shape: tuple[int, ...]
    rank: int | None = None
    side: str | None = None
    predicted: WeightBytes | None = None
    reason: str | None = None
    unknown: str | None = None

    @property
    def state_bytes(self) -> int | None:
        return None if self.predicted is None else self.predicted.moments + self.predicted.projector


@dataclass(frozen=True)
class LowRankSummary:
    rows: list[Row]
    states: dict[str, int] | None
    """Predicted optimizer state by :meth:`LowRankOptimizer.state_bytes`'s roles (``moments``,
    ``projectors``, ``dense``); None if unknown."""
    adamw_bytes: int
    """Full-rank AdamW's two moments for every parameter in the optimizer."""

    @property
    def state_bytes(self) -> int | None:
        """Predicted optimizer state in all; None if unknown."""
        return None if self.states is None else sum(self.states.values())

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
                rows.append(_projected_row(names.get(id(p), "unnamed"), p, group, optimizer))
            else:
                dense_bytes += _dense_bytes(p, group, optimizer)
    predicted = [row.predicted for row in rows]
    states = None if None in predicted else {"moments": sum(w.moments for w in predicted),
                                             "projectors": sum(w.projector for w in predicted), "dense": dense_bytes}
    projected = {id(p) for group in optimizer.param_groups if group["lowrank"] for p in group["params"]}
    for choice in classify(model, targets, exclude):
        if id(choice.param) not in projected:
            reason = choice.reason or "not in the optimizer"
            rows.append(Row(choice.name, tuple(choice.param.shape), reason=reason))
    return LowRankSummary(rows, states, adamw)


def _projected_row(name: str, p: Tensor, group: dict, optimizer: LowRankOptimizer) -> Row:
    tensors = get_projector(group["projector"]).projects_tensors
    view = View.of(p, group.get("layout", "matrix"), tensors)
    rank = group["rank"] if tensors else min(group["rank"], *view.matrix)
    side = "modes" if tensors else choose_side(group["side"], view.matrix).name.lower()
    try:
        return Row(name, tuple(p.shape), rank, side, predicted=_weight_bytes(p, view, rank, group, optimizer))
    except Exception as error:  # noqa: BLE001 — a component that needs real values (a spectrum's .item())
        return Row(name, tuple(p.shape), rank, side, unknown=f"{type(error).__name__}: {error}")


def _weight_bytes(p: Tensor, view: View, rank: int, group: dict, optimizer: LowRankOptimizer) -> WeightBytes:
    """One weight's components built and run on a ``meta`` gradient of its view's shape."""
    inner, rule = optimizer._group_components(group)
    projector = build("projector", group, rank=rank, side=group["side"], seed=0)
    grad = torch.empty(view.shape, dtype=p.dtype, device="meta")
    projector.refresh(grad)
    low = projector.project(grad)  # R's shape, from the projector
    moments = tensor_bytes(inner.init_state(low)) + tensor_bytes(rule.state_layout(grad, low, projector))
    return WeightBytes(moments, projector.resident_bytes(), tensor_bytes(low))


def _dense_bytes(p: Tensor, group: dict, optimizer: LowRankOptimizer) -> int:
    """A dense parameter's fresh state: its inner optimizer's where it steps dense groups (SGD,
    HF AdamW), else torch AdamW's two moments."""
    like = torch.empty(p.shape, dtype=p.dtype, device="meta")
    inner = optimizer._dense_inner(group)
    return tensor_bytes(inner.init_state(like)) if inner is not None else 2 * tensor_bytes(like)


def _size(nbytes: int | None) -> str:
    """Bytes for a reader: ``"unknown"``, ``"512 B"``, ``"1.5 KB"`` ... ``"GB"``."""
    if nbytes is None:
        return "unknown"
    if nbytes < 1024:
        return f"{nbytes} B"
    exponent = min(3, int(math.log(nbytes, 1024)))
    return f"{nbytes / 1024**exponent:.1f} {('KB', 'MB', 'GB')[exponent - 1]}"
