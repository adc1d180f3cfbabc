"""``LowRankOptimizer``: one ``torch.optim.Optimizer`` for low-rank-projected and dense weights.

Per low-rank weight with gradient ``G`` (m×n), each step (DESIGN.md §1):

1. ``schedule.should_refresh(step)`` → ``projector.refresh(G)`` (moments kept, reset or rotated);
2. ``R = projector.project(G)``;
3. ``N = inner.directions(R)`` (moments in R's shape);
4. decoupled weight decay ``W ← (1 − ηλ) W``, then ``rule.apply_``: ``W ← W − η U``.

Parameters in groups without ``lowrank=True`` get torch's AdamW (fused kernel where available).
Components are looked up by registered name, so any installed plugin can be named here.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.adamw import adamw as adamw_functional

from lit_lowrank.inner.base import InnerOptimizer
from lit_lowrank.optim.validation import build, check_bases, check_group
from lit_lowrank.projectors.base import Projector
from lit_lowrank.rules.base import RuleInputs, UpdateRule
from lit_lowrank.schedules.base import Schedule


@dataclass
class LowRankSlot:
    """The per-weight objects that are not plain tensors; saved through their state dicts."""

    projector: Projector
    schedule: Schedule


class LowRankOptimizer(torch.optim.Optimizer):
    """AdamW whose ``lowrank=True`` param groups are updated in a low-rank subspace.

    Args:
        params: parameters or param groups, as for ``torch.optim.AdamW``. Groups with
            ``lowrank=True`` must hold 2-D tensors only; ``build_optimizer`` makes them.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decay decoupled, before the step).
        rank: subspace rank r; clamped to ``min(m, n)`` with a warning.
        projector: registered projector name (``svd``, ...).
        side: ``std | reverse_std | left | right | full`` (see :func:`choose_side`).
        update_gap: steps between refreshes, T (passed to schedules that take ``gap``).
        scale: the update scale α.
        rule: registered update rule (``galore``, ...).
        inner: registered inner optimizer (``adamw``, ...).
        schedule: registered schedule (``fixed``, ...).
        on_refresh: what happens to the moments when the basis changes: ``keep | reset | rotate``.
        projector_args, rule_args, inner_args, schedule_args: extra keyword arguments of each
            component.

    Every option can also be set per param group.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        rank: int = 128,
        projector: str = "svd",
        side: str = "std",
        update_gap: int = 200,
        scale: float = 0.25,
        rule: str = "galore",
        inner: str = "adamw",
        schedule: str = "fixed",
        on_refresh: str = "keep",
        projector_args: dict[str, Any] | None = None,
        rule_args: dict[str, Any] | None = None,
        inner_args: dict[str, Any] | None = None,
        schedule_args: dict[str, Any] | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, lowrank=False,
            rank=rank, projector=projector, side=side, update_gap=update_gap, scale=scale,
            rule=rule, inner=inner, schedule=schedule, on_refresh=on_refresh,
            projector_args=dict(projector_args or {}), rule_args=dict(rule_args or {}),
            inner_args=dict(inner_args or {}), schedule_args=dict(schedule_args or {}),
        )
        super().__init__(params, defaults)
        self._slots: dict[Tensor, LowRankSlot] = {}
        self._components: dict[int, tuple[InnerOptimizer, UpdateRule]] = {}
        self._index = {p: i for i, p in enumerate(self._params())}
        self._warned_ranks: set[tuple[int, int, int]] = set()
        self.refresh_count = 0
        for group in self.param_groups:
            self._validate(group)

    # ------------------------------------------------------------------ setup
    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _validate(self, group: dict[str, Any]) -> None:
        """Refuse a group whose options, components or parameters do not fit (see
        :func:`~lit_lowrank.optim.validation.check_group`), now rather than at the first step."""
        check_group(group)
        if not group["lowrank"]:
            if any(hasattr(p, "weight_store") for p in group["params"]):
                raise ValueError("a quantized weight (with a weight_store) is in a dense group; "
                                 "add its module name to the low-rank `targets`.")
            return
        for p in group["params"]:
            if p.ndim != 2:
                raise ValueError(
                    f"low-rank param groups take 2-D weights only, got shape {tuple(p.shape)}; "
                    "put it in a group without lowrank=True (build_optimizer does this)."
                )
        self._group_components(group)

    def _group_components(self, group: dict[str, Any]) -> tuple[InnerOptimizer, UpdateRule]:
        key = id(group)
        if key not in self._components:
            inner = build("inner", group, betas=group["betas"], eps=group["eps"])
            rule = build("rule", group, scale=group["scale"])
            self._components[key] = (inner, rule)
        return self._components[key]

    def _slot(self, p: Tensor, group: dict[str, Any]) -> LowRankSlot:
        slot = self._slots.get(p)
        if slot is None:
            slot = self._slots[p] = self._make_slot(p, group)
        return slot

    def _make_slot(self, p: Tensor, group: dict[str, Any]) -> LowRankSlot:
        m, n = p.shape
        rank = group["rank"]
        if rank > min(m, n):
            if (m, n, rank) not in self._warned_ranks:
                warnings.warn(f"rank {rank} exceeds min{(m, n)} of a {m}×{n} weight; clamped to "
                              f"{min(m, n)} (full rank, no memory saved for it).", stacklevel=4)
                self._warned_ranks.add((m, n, rank))
            rank = min(m, n)
        projector = build("projector", group, rank=rank, side=group["side"], seed=self._index[p])
        schedule = build("schedule", group, gap=group["update_gap"])
        return LowRankSlot(projector, schedule)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self.step_group(group, [p for p in group["params"] if p.grad is not None])
        return loss

    @torch.no_grad()
    def step_group(self, group: dict[str, Any], params: list[Tensor], lows: dict[Tensor, Tensor] | None = None,
                   ) -> None:
        """Update ``params`` (members of ``group`` that have gradients); layer-wise mode calls
        this with one parameter at a time.

        ``lows`` gives, for low-rank params of a step that does not refresh their subspace
        (:meth:`needs_full_gradient` is False), the projected gradient ``R`` to use instead of
        projecting ``p.grad`` (which may then be None): layer-wise gradient accumulation sums
        ``R`` over micro-batches instead of the full gradient.
        """
        if not params:
            return
        lows = lows or {}
        for p in params:
            if p not in lows and p.grad.is_sparse:
                raise RuntimeError("LowRankOptimizer does not support sparse gradients")
        if group["lowrank"]:
            self._lowrank_step(group, params, lows)
        else:
            self._dense_step(group, params)

    def needs_full_gradient(self, p: Tensor, group: dict[str, Any]) -> bool:
        """Whether ``p``'s next step needs its full gradient, not only its projection ``R``: a
        dense param, a rule that uses ``G`` (``UpdateRule.uses_gradient``: Fira, APOLLO), or a
        step that refreshes the subspace (always the first)."""
        if not group["lowrank"] or self._group_components(group)[1].uses_gradient:
            return True
        slot, state = self._slots.get(p), self.state.get(p, {})
        if slot is None or "step" not in state:
            return True
        return slot.schedule.should_refresh(int(state["step"]))

    def project(self, p: Tensor, grad: Tensor) -> Tensor:
        """``R``: ``grad`` projected on ``p``'s current subspace (after its first step)."""
        return self._slots[p].projector.project(grad)

    def _dense_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        states = []
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif fused and state["step"].device != p.device:  # torch loads steps onto the CPU
                state["step"] = state["step"].to(p.device)
            states.append(state)
        beta1, beta2 = group["betas"]
        adamw_functional(
            params, [p.grad for p in params], [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states],
            foreach=None if fused else True, fused=fused or None, amsgrad=False, beta1=beta1,
            beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
            maximize=False,
        )

    def _lowrank_step(self, group: dict[str, Any], params: list[Tensor], lows: dict[Tensor, Tensor]) -> None:
        inner, rule = self._group_components(group)
        by_step: dict[int, list[tuple[Tensor, Tensor, dict, LowRankSlot]]] = defaultdict(list)
        for p in params:
            state, slot = self.state[p], self._slot(p, group)
            fresh = "step" not in state
            step = 0 if fresh else int(state["step"])
            if slot.schedule.should_refresh(step):
                if p in lows:
                    raise RuntimeError("a projected gradient was given for a step that refreshes the subspace; "
                                       "check needs_full_gradient() before projecting")
                self._refresh(p.grad, slot, state, inner, group, step)
            low = lows[p] if p in lows else slot.projector.project(p.grad)
            if fresh:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state.update(inner.init_state(low))
            state["step"] += 1
            by_step[step + 1].append((p, low, state, slot))
        lr, decay = group["lr"], group["weight_decay"]
        for step, items in by_step.items():
            directions = inner.directions([low for _, low, _, _ in items], [s for _, _, s, _ in items], step)
            for (p, low, state, slot), direction in zip(items, directions):
                weight = float_weight(p)
                if decay:
                    weight.mul_(1 - lr * decay)
                rule.apply_(weight, RuleInputs(p.grad, low, direction, slot.projector, state), step_size=lr)
                if weight is not p:
                    p.weight_store.store_(weight)

    def _refresh(self, grad: Tensor, slot: LowRankSlot, state: dict, inner: InnerOptimizer,
                 group: dict[str, Any], step: int) -> None:
        projector = slot.projector
        old = projector.bases() if projector.refreshes else None
        projector.refresh(grad)
        check_bases(projector, grad, min(group["rank"], *grad.shape), group["projector"])
        similarity = None
        if old is not None:
            new = projector.bases()
            similarity = leading_similarity(old, new)
            if "step" in state:  # only `rotate` needs the basis maps L_newᵀL_old, Q_newᵀQ_old
                rotate = group["on_refresh"] == "rotate"
                maps = [None if n is None or not rotate else n.T @ o for o, n in zip(old, new)]
                inner.on_refresh(state, group["on_refresh"], *maps)
        slot.schedule.after_refresh(step, similarity)
        self.refresh_count += 1

    # ------------------------------------------------------------------ state
    @property
    def projectors(self) -> dict[Tensor, Projector]:
        """The projector of each low-rank weight that has been stepped, by parameter."""
        return {p: slot.projector for p, slot in self._slots.items()}

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus ``"lowrank"``: per param index, the projector's and the
        schedule's tensor-only state dicts."""
        state_dict = super().state_dict()
        state_dict["lowrank"] = {
            self._index[p]: {"projector": slot.projector.state_dict(), "schedule": slot.schedule.state_dict()}
            for p, slot in self._slots.items()
        }
        state_dict["refresh_count"] = self.refresh_count
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        lowrank = state_dict.pop("lowrank", {})
        self.refresh_count = int(state_dict.pop("refresh_count", 0))
        super().load_state_dict(state_dict)
        params, self._slots = self._params(), {}
        groups = {p: group for group in self.param_groups for p in group["params"]}
        for index, entry in lowrank.items():
            p = params[int(index)]
            slot = self._make_slot(p, groups[p])
            slot.projector.load_state_dict(_to_device(entry["projector"], p.device))
            slot.schedule.load_state_dict(entry["schedule"])
            self._slots[p] = slot
        for index, saved in state_dict.get("state", {}).items():
            # torch casts every state tensor to the param's dtype; packed (quantized) moments
            # must keep theirs (uint8 codes, float32 scales, int64 shape)
            p = params[int(index)]
            for key, value in saved.items():
                if isinstance(value, dict):
                    self.state[p][key] = {k: v.to(p.device, copy=True) for k, v in value.items()}

    def state_bytes(self) -> dict[str, int]:
        """Bytes of optimizer state by role: ``moments`` (low-rank moments and rule state),
        ``projectors`` (bases, indices, packed bases), ``dense`` (AdamW moments of dense params).
        Scalar bookkeeping (step counters, sides, seeds) is not counted."""
        sizes = {"moments": 0, "projectors": 0, "dense": 0}
        for group in self.param_groups:
            role = "moments" if group["lowrank"] else "dense"
            for p in group["params"]:
                sizes[role] += tensor_bytes(self.state.get(p, {}))
        for slot in self._slots.values():
            sizes["projectors"] += tensor_bytes(slot.projector.state_dict())
        return sizes


def float_weight(p: Tensor) -> Tensor:
    """The tensor an update is applied to: ``p`` itself, or, for a parameter whose values live
    elsewhere (a ``p.weight_store`` such as an INT8 ``QuantizedLinear``; Q-GaLore §3.4), a float
    copy ``store.float_weight()`` that ``store.store_(weight)`` re-quantizes after the update."""
    store = getattr(p, "weight_store", None)
    return p if store is None else store.float_weight()


def leading_similarity(old: tuple[Tensor | None, ...], new: tuple[Tensor | None, ...]) -> float:
    """|cos| between the first basis vectors of two bases (sign-invariant: SVD signs are arbitrary)."""
    old_basis, new_basis = (old[0], new[0]) if old[0] is not None else (old[1], new[1])
    return F.cosine_similarity(old_basis[:, 0].float(), new_basis[:, 0].float(), dim=0).abs().item()


def tensor_bytes(value: Any) -> int:
    """Storage bytes of the non-scalar tensors in ``value`` (a tensor or nested dicts of them);
    0-dim bookkeeping (steps, sides, seeds) counts nothing."""
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, Tensor) and value.ndim > 0:
        return value.numel() * value.element_size()
    return 0


def _to_device(tree: Any, device: torch.device) -> Any:
    if isinstance(tree, Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: _to_device(v, device) for k, v in tree.items()}
    return tree
