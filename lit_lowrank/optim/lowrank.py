"""``LowRankOptimizer``: one ``torch.optim.Optimizer`` for low-rank-projected and dense weights.

Per low-rank weight with gradient ``G`` (m×n), each step:

1. ``schedule.should_refresh(step)`` → ``projector.refresh(G)`` (moments kept, reset or rotated);
2. ``R = projector.project(G)``;
3. ``N = inner.directions(R)`` (moments in R's shape);
4. decoupled weight decay ``W ← (1 − ηλ) W``, then ``rule.apply_``: ``W ← W − η U`` (an inner
   optimizer with ``decay_after_step`` decays after the update; ``step_size_factor(t)`` scales η).

A group with ``decoupled_weight_decay=False`` takes torch Adam's and SGD's coupled L2 instead:
``G + λW`` is projected (and refreshes the basis), so the decay goes through the moments.
Parameters in groups without ``lowrank=True`` get torch's AdamW (fused kernel where available),
or torch Adam with coupled L2, or — for an inner optimizer that ``steps_dense`` (SGD, ``adamw-hf``)
— that inner optimizer's own update on the full gradient.
Components are looked up by registered name, so any installed plugin can be named here.
"""

from __future__ import annotations

import copy
import warnings
from collections import defaultdict
from dataclasses import replace
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.adam import adam as adam_functional

from lit_lowrank import plugins
from lit_lowrank.inner.base import InnerOptimizer
from lit_lowrank.optim import checkpoint
from lit_lowrank.optim.deferred import DeferredLifts, LaterUpdates, LowRankUpdate, decoupled_decay
from lit_lowrank.optim.guard import MAX_CONSECUTIVE_SKIPS, HeldInterrupt, StepJournal, first_nonfinite
from lit_lowrank.optim.delivery import GradientDelivery, shape_only
from lit_lowrank.optim.layouts import View, check_layout, target_layout
from lit_lowrank.optim.validation import (
    build, build_inner, build_rule, check_bases, check_batched, check_group, check_sharding, check_tensor_projector,
)
from lit_lowrank.optim.placement import LowRankSlot, Placements, placement_of
from lit_lowrank.optim.refresh_sharing import SharedRefresh, check_refresh_sharing_option, shares_refresh
from lit_lowrank.optim.sharding import applies_bases_plainly
from lit_lowrank.options import SEED_STRIDE, having
from lit_lowrank.projectors.base import Projector
from lit_lowrank.rules.base import UpdateRule
from lit_lowrank.transforms.base import stored_weight


Deferred = tuple[Tensor, DeferredLifts, Tensor, float, float, bool]
"""A low-rank weight's update left for the apply phase: the parameter, its recorded lifts, the
tensor written (its local part), η, λ (0 without decoupled decay) and whether the decay follows
the update (``InnerOptimizer.decay_after_step``)."""
ADAMW_BETAS, ADAMW_EPS = (0.9, 0.999), 1e-8
"""torch AdamW's defaults: dense groups stepped by torch's AdamW whose ``betas``/``eps`` are unset."""
COMPONENT_OPTIONS = having("builds")
"""The group options a group's inner optimizer and rule are built from."""


def component_options(group: dict[str, Any]) -> dict[str, Any]:
    return {key: copy.deepcopy(group[key]) for key in COMPONENT_OPTIONS}


class LowRankOptimizer(GradientDelivery, checkpoint.CheckpointMapping, torch.optim.Optimizer):
    """AdamW whose ``lowrank=True`` param groups are updated in a low-rank subspace.

    Args:
        params: parameters or param groups, as for ``torch.optim.AdamW``. Groups with
            ``lowrank=True`` hold 2-D weights, or, with the group key ``layout``, stacked
            experts (``experts``: E×m×n) or conv kernels (``kernel``); see
            :mod:`lit_lowrank.optim.layouts`. ``build_optimizer`` makes these groups.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decay decoupled, before the step;
            ``inner="adamw-hf"``: as ``transformers.AdamW``, after it, for every group).
            ``betas``/``eps`` left None take the inner optimizer's own defaults (Lion's betas
            (0.9, 0.99), HF AdamW's eps 1e-6) and AdamW's for dense groups; each group then
            shows the values in use.
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
        nonfinite: what a step does when a gradient holds NaN/inf: ``skip`` the whole step
            (counted in :attr:`skipped_steps`, with a warning naming the parameter), ``raise``
            ``FloatingPointError``, or ``ignore`` (no check). A non-finite *weight* found then
            raises ``FloatingPointError`` naming it (skipping cannot recover a corrupted model).
            See :mod:`lit_lowrank.optim.guard`.
        max_consecutive_skips: with ``nonfinite: skip``, the most updates of one parameter
            skipped in a row (steps; parameter updates in layer-wise mode): the next one raises
            ``FloatingPointError`` naming the parameter, instead of finishing a run that no
            longer trains. A good update resets the count (checkpointed); None: no bound; 0 is
            refused (None, or ``nonfinite: raise``).
        refresh_sharing: under data parallelism, whether each weight's subspace refresh is
            computed by one rank and its bases broadcast to the others (the same weights,
            bitwise; the refresh time falls with the ranks): ``auto`` when the gradients are
            known to be the same on every rank (FSDP2, or :attr:`gradients_identical` set by
            the ``ddp_lowrank`` strategy or the low-rank communication hook), ``on`` for plain
            torch DDP, ``off``. See :mod:`lit_lowrank.optim.refresh_sharing`.
        projector_seed: which draws the random projections (``random``, ``rsvd``'s sketch, a
            plugin's) make: each weight's projector is seeded with its parameter index +
            ``projector_seed`` · 2³²; 0 (default) keeps the draws of earlier runs, another value
            gives the run other projections (a checkpoint resumes only with its own value).
        is_target: for :meth:`add_param_group`: which parameters of a group given without a
            ``lowrank`` key are projected — True (2-D weights) or a layout name, falsy for dense
            (``build_optimizer`` passes its target selection).

    Every option can also be set per param group, and a group may set
    ``decoupled_weight_decay=False`` for torch Adam's / SGD's coupled L2 (``G + λW``). A step
    updates every parameter or none: gradients are checked and subspaces refreshed (rolled back
    if one fails) before any moment or weight changes.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
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
        nonfinite: str = "skip",
        max_consecutive_skips: int | None = MAX_CONSECUTIVE_SKIPS,
        refresh_sharing: str = "auto",
        projector_seed: int = 0,
        is_target: Callable[[Tensor], bool] | None = None,
    ) -> None:
        self._is_target = is_target
        defaults = dict(
            lr=lr, betas=None if betas is None else tuple(betas), eps=eps, weight_decay=weight_decay, lowrank=False,
            rank=rank, projector=projector, side=side, update_gap=update_gap, scale=scale,
            rule=rule, inner=inner, schedule=schedule, on_refresh=on_refresh,
            projector_args=dict(projector_args or {}), rule_args=dict(rule_args or {}),
            inner_args=dict(inner_args or {}), schedule_args=dict(schedule_args or {}), nonfinite=nonfinite,
            max_consecutive_skips=max_consecutive_skips, refresh_sharing=refresh_sharing,
            projector_seed=projector_seed,
        )
        super().__init__(params, defaults)
        self._slots: dict[Tensor, LowRankSlot] = {}
        self._components: dict[int, tuple[dict[str, Any], InnerOptimizer, UpdateRule]] = {}
        """By param-group index: the options the components were built from, the inner optimizer, the rule."""
        self._index = {p: i for i, p in enumerate(self._params())}
        self._warned_ranks: set[tuple[int, int, int]] = set()
        self.rank_ledger: dict[int, int] = {}
        """Ranks granted by adaptive-rank projectors, by parameter index: their shared budget
        (offered to projectors as ``ledger``); restored from their state on resume."""
        self.refresh_count = 0
        self.skipped_steps = 0
        """Steps skipped for a non-finite gradient (``nonfinite: skip``); in layer-wise mode,
        skipped parameter updates."""
        self._skip_streaks: dict[Tensor, int] = {}
        """Updates skipped in a row, by parameter (only those with one at least): bounded by
        ``max_consecutive_skips``, reset by a good update."""
        self.comm_bytes: int | None = None
        """Bytes this rank exchanged for the last step: what it all-reduced for the gradients,
        counted by lit_lowrank's own communication (:mod:`lit_lowrank.optim.communication`,
        layer-wise DDP), plus what the step itself exchanged — for weights sharded by FSDP its
        collectives (:class:`RowShard`'s), under refresh sharing the projector states broadcast
        (:attr:`SharedRefresh.sent`: the payload of each broadcast, on every rank); None without
        any of these."""
        self._own_traffic_only = False
        """Whether ``comm_bytes`` holds only what the steps exchanged themselves (no communication
        of lit_lowrank counts the gradients): each step then sets it anew."""
        self._refresh_sent = 0
        """Bytes of the step's projector-state broadcasts (refresh sharing)."""
        self._received: dict[Tensor, Tensor] = {}
        """The projected gradients delivered through :meth:`receive` for the next step, by parameter."""
        self._placements = Placements()
        """Where each parameter lives (:mod:`~lit_lowrank.optim.placement`): whole on this rank, or
        this rank's rows of a weight FSDP2 splits."""
        self.gradients_identical = False
        """Whether the gradients a step reads are the same on every rank (averaged by the
        ``ddp_lowrank`` strategy, the low-rank communication hook or layer-wise DDP, which set
        it): lets ``refresh_sharing: auto`` share the refreshes."""
        for group in self.param_groups:
            self._validate(group)
        self._refuse_partial_sharding()

    # ------------------------------------------------------------------ setup
    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _validate(self, group: dict[str, Any]) -> None:
        """Refuse a group whose options, components or parameters do not fit (see
        :func:`~lit_lowrank.optim.validation.check_group`), now rather than at the first step."""
        check_group(group)
        check_refresh_sharing_option(group["refresh_sharing"])
        placements = {p: placement_of(p, check_sharding(group)) for p in group["params"]}
        if not group["lowrank"] and self._dense_inner(group) is None:  # torch's AdamW/Adam
            group["betas"] = ADAMW_BETAS if group["betas"] is None else group["betas"]
            group["eps"] = ADAMW_EPS if group["eps"] is None else group["eps"]
        if not group["lowrank"]:
            if any(stored_weight(p) is not None for p in group["params"]):
                raise ValueError("a weight stored in another format (int-weights) is in a dense group; "
                                 "add its module name to the low-rank `targets`.")
            self._dense_inner(group)  # an inner optimizer that steps dense params is built (probed) now
        else:
            layout = group.get("layout", "matrix")
            for p in group["params"]:
                check_layout(layout, p)
            if layout == "experts":
                check_batched(group)
            if plugins.get_projector(group["projector"]).projects_tensors:
                check_tensor_projector(group)
            self._group_components(group)
        self._placements.admit(placements)

    def _refuse_partial_sharding(self) -> None:
        """Refuse a parameter held whole beside parameters FSDP shards: nothing would average
        its gradient over the ranks, so each rank would train its own copy."""
        whole = self._placements.whole_beside_rows()
        if whole is not None:
            raise ValueError(f"{self._name(whole)} is whole on this rank while other parameters are sharded by FSDP, "
                             "so its gradient is not averaged over the ranks; apply fully_shard to the root module "
                             "too (it takes every parameter no inner module holds).")

    @property
    def sharded(self) -> bool:
        """Whether some parameters are split by rows across ranks (FSDP2's ``fully_shard``)."""
        return self._placements.sharded

    def _group_components(self, group: dict[str, Any]) -> tuple[InnerOptimizer, UpdateRule]:
        """The group's inner optimizer and rule, rebuilt whenever an option they are built from
        changes (``betas`` edited mid-run, a group replaced by :meth:`load_state_dict`). ``betas``
        and ``eps`` left None are filled in from the inner optimizer, so the group shows what is used."""
        index = next(i for i, g in enumerate(self.param_groups) if g is group)
        cached = self._components.get(index)
        if cached is None or cached[0] != component_options(group):
            inner = build_inner(group)
            rule = build_rule(group, inner)
            for key in ("betas", "eps"):
                if group[key] is None and hasattr(inner, key):
                    group[key] = getattr(inner, key)
            cached = self._components[index] = (component_options(group), inner, rule)
        return cached[1], cached[2]

    def _slot(self, p: Tensor, group: dict[str, Any]) -> LowRankSlot:
        slot = self._slots.get(p)
        if slot is None:
            slot = self._slots[p] = self._make_slot(p, group)
        return slot

    def _make_slot(self, p: Tensor, group: dict[str, Any]) -> LowRankSlot:
        tensors = plugins.get_projector(group["projector"]).projects_tensors
        view = View.of(p, group.get("layout", "matrix"), tensors)
        m, n = view.matrix
        rank = group["rank"]
        if rank > min(m, n) and not tensors:  # a tensor projector clamps each mode's rank itself
            if (m, n, rank) not in self._warned_ranks:
                warnings.warn(f"rank {rank} exceeds min{(m, n)} of a {m}×{n} weight; clamped to "
                              f"{min(m, n)} (full rank, no memory saved for it).", stacklevel=4)
                self._warned_ranks.add((m, n, rank))
            rank = min(m, n)
        seed = self._index[p] + group["projector_seed"] * SEED_STRIDE
        projector = build("projector", group, rank=rank, side=group["side"], seed=seed,
                          ledger=self.rank_ledger)
        schedule = build("schedule", group, gap=group["update_gap"])
        schedule.set_position(*self._lowrank_position(p))
        return LowRankSlot(projector, schedule, view, self._placements[p])

    def _lowrank_position(self, p: Tensor) -> tuple[int, int]:
        """``p``'s index among the optimizer's low-rank weights, in param-group order (the same on
        every rank and in layer-wise mode), and their count: what a staggered schedule phases by."""
        lowrank = [q for group in self.param_groups if group["lowrank"] for q in group["params"]]
        return next(index for index, q in enumerate(lowrank) if q is p), len(lowrank)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (e.g. layers Lightning's ``BaseFinetuning`` unfreezes), validated and
        indexed like the constructor's; options it lacks come from the constructor's defaults.
        A group without a ``lowrank`` key is split by ``is_target`` into projected groups (its
        target weights, one group per layout) and a dense one."""
        for group in self._split_targets(param_group):
            super().add_param_group(group)
            if hasattr(self, "_index"):  # after construction; the constructor checks its own groups
                self._admit_group(self.param_groups[-1])

    def _split_targets(self, group: dict[str, Any]) -> list[dict[str, Any]]:
        params = [group["params"]] if isinstance(group["params"], Tensor) else list(group["params"])
        if self._is_target is None or "lowrank" in group or not params:
            return [group]
        names = group.get("names")
        layouts = [target_layout(self._is_target(p), p) for p in params]
        parts = []
        for layout in dict.fromkeys(layouts):
            chosen = [i for i, found in enumerate(layouts) if found == layout]
            part = {**group, "params": [params[i] for i in chosen], "lowrank": layout is not None}
            if layout not in (None, "matrix"):
                part["layout"] = layout
            if names is not None:
                part["names"] = [names[i] for i in chosen]
            parts.append(part)
        return sorted(parts, key=lambda part: not part["lowrank"])

    def _admit_group(self, group: dict[str, Any]) -> None:
        try:
            self._validate(group)
            self._refuse_partial_sharding()
        except Exception:
            for p in group["params"]:
                self._placements.pop(p, None)
            self._components.pop(len(self.param_groups) - 1, None)
            self.param_groups.pop()
            raise
        self._index.update({p: len(self._index) + i for i, p in enumerate(group["params"])})

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        received, self._received = self._received, {}
        work = [(group, [p for p in group["params"] if p.grad is not None or p in received])
                for group in self.param_groups]
        work = [(group, params) for group, params in work if params]
        if not work and not self.state:
            warnings.warn("the first step() found no gradient on any of the optimizer's parameters, so nothing was "
                          "updated. If the model was sharded (fully_shard), wrapped or copied after the optimizer "
                          "was built, its parameters are new tensors: build the optimizer afterwards.",
                          RuntimeWarning, stacklevel=3)
        sent, self._refresh_sent = self._placements.sent(), 0
        try:
            self._step_all(work, received)
        except BaseException:
            self._received = received  # a retried step uses them, as this one would have
            raise
        self._count_traffic(self._placements.sent() - sent + self._refresh_sent)
        return loss

    def _count_traffic(self, own: int) -> None:
        """Set :attr:`comm_bytes` after a step that exchanged ``own`` bytes itself: ``own`` alone
        where nothing else counts (FSDP's sharded weights; plain DDP with shared refreshes, 0 on a
        step without any), else added to the gradients' bytes lit_lowrank's communication counted
        for this step."""
        if self.sharded or self._own_traffic_only or (own and self.comm_bytes is None):
            self.comm_bytes, self._own_traffic_only = own, True
        elif self.comm_bytes is not None:
            self.comm_bytes += own

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._received.clear()

    @torch.no_grad()
    def step_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Update ``params`` (members of ``group`` that have gradients); layer-wise mode calls
        this with one parameter at a time.

        A param whose ``R`` came through :meth:`receive` (for a step that does not refresh its
        subspace) is stepped with it instead of projecting ``p.grad`` (which may then be None):
        layer-wise gradient accumulation sums ``R`` over micro-batches instead of the full
        gradient. The ``R`` of ``params`` are used up here, even if the step fails. Refreshes are
        not shared across ranks here: a weight's step runs while other weights' all-reduces are in
        flight, and a collective of its own would interleave with them differently on each rank.
        """
        if not params:
            return
        received = {p: self._received.pop(p) for p in params if p in self._received}
        self._step_all([(group, params)], received, share_refreshes=False)

    def _step_all(self, work: list[tuple[dict[str, Any], list[Tensor]]], lows: dict[Tensor, Tensor], *,
                  share_refreshes: bool = True) -> None:
        """One atomic step of ``work`` (groups and their params with gradients), in the phases of
        :mod:`~lit_lowrank.optim.guard`: gradients are checked for all of them before anything
        changes; then every update is computed (subspaces refreshed, moments updated, rules run),
        recorded in a :class:`~lit_lowrank.optim.guard.StepJournal` that undoes it all if
        anything fails (a component raising, Ctrl-C) before the error is re-raised; then the
        weights are written, Ctrl-C held until the step is complete (:meth:`_write_weights`)."""
        if not work:
            return
        projected = self._screening_projections(work, lows)
        if not self._admit_gradients(work, lows, projected):
            return
        journal, interrupt = StepJournal(), HeldInterrupt()
        last = max((index for index, (group, _) in enumerate(work) if self._torch_adamw(group)), default=None,
                   key=lambda index: sum(p.numel() for p in work[index][1]))
        deferred: list[Deferred] = []
        later: list[LaterUpdates] = []
        try:
            self._record_subspaces(work, journal)
            old_bases = self._refresh_subspaces(work, lows, share_refreshes)
            for group, params in [item for index, item in enumerate(work) if index != last]:
                if group["lowrank"]:
                    self._lowrank_step(group, params, lows, projected, old_bases, journal, deferred, later)
                else:
                    self._dense_step(group, params, journal)
        except BaseException:
            journal.undo()
            raise
        with interrupt.held():
            self._write_weights(None if last is None else work[last], deferred, later, journal)
        if self._skip_streaks:  # an update ends its parameter's run of skipped ones
            for _, params in work:
                for p in params:
                    self._skip_streaks.pop(p, None)
        interrupt.raise_held()

    def _write_weights(self, last: tuple[dict[str, Any], list[Tensor]] | None, deferred: list[Deferred],
                       later: list[LaterUpdates], journal: StepJournal) -> None:
        """The apply phase: torch's AdamW on ``last``, the largest dense group, without copies
        of its weights and moments (they would triple its memory; torch checks its inputs before
        changing any, and a refusal undoes the step); then the recorded lifts of the low-rank
        weights, each with its decoupled decay (``W ← (1 − ηλ) W − η U``), in place; then the
        ``later`` updates (moments advanced, weights written). A failure of these in-place kernels
        (out of memory) leaves the step partly applied: RuntimeError."""
        if last is not None:
            try:
                self._dense_step(*last, journal, copies=False)
            except BaseException:
                journal.undo()
                raise
        written: set[Tensor] = set()
        try:
            for p, lifts, weight, lr, decay, after in deferred:
                with decoupled_decay(weight, lr, decay, after=after):
                    lifts.write()
                written.add(p)
            for updates in later:
                for p in updates.write():
                    written.add(p)
        except Exception as error:
            order = [item[0] for item in deferred] + [update.p for updates in later for update in updates.updates]
            missed = ", ".join(self._name(p) for p in order if p not in written)
            raise RuntimeError(
                f"the step was partly applied: writing the updated weights failed ({error}) after every update "
                f"had been computed; weights whose update was not written in full: {missed}. Resume from a "
                "checkpoint (see lit_lowrank.optim.guard).") from error

    def _torch_adamw(self, group: dict[str, Any]) -> bool:
        """Whether torch's AdamW (or Adam, coupled L2) steps ``group``: a dense group whose inner
        optimizer does not step dense params."""
        return not group["lowrank"] and self._dense_inner(group) is None

    def _record_subspaces(self, work: list[tuple[dict[str, Any], list[Tensor]]], journal: StepJournal) -> None:
        """Record what the refresh and its aftermath may change: the counters, the projector and
        schedule of each weight due for a refresh, the absence of each weight's slot not made yet."""
        journal.attribute(self, "refresh_count")
        journal.contents(self.rank_ledger)
        for group, params in work:
            if not group["lowrank"]:
                continue
            for p in params:
                slot, state = self._slots.get(p), self.state.get(p, {})
                if slot is None:
                    journal.entry(self._slots, p)
                elif slot.schedule.should_refresh(int(state["step"]) if "step" in state else 0):
                    journal.stateful(slot.projector)
                    journal.stateful(slot.schedule)

    def _screening_projections(self, work: list[tuple[dict[str, Any], list[Tensor]]], lows: dict[Tensor, Tensor],
                               ) -> dict[Tensor, Tensor]:
        """``R``, computed now, of each guarded low-rank weight whose step projects ``p.grad`` on
        the basis it already has (no refresh this step) by plain matrix products: the guard
        screens ``R`` instead of ``G`` (a NaN or inf of ``G`` reaches ``R``; r/min(m, n) of the
        reading), and the step uses it as it is."""
        projected = {}
        for group, params in work:
            if not group["lowrank"] or group["nonfinite"] == "ignore":
                continue
            for p in params:
                slot, state = self._slots.get(p), self.state.get(p, {})
                if (p in lows or slot is None or "step" not in state or slot.schedule.should_refresh(int(state["step"]))
                        or not applies_bases_plainly(type(slot.projector))):
                    continue
                weight, grad = self._local(p)
                projected[p] = slot.applied.project(slot.local_view(weight)(l2_gradient(grad, weight, group)))
        return projected

    def _admit_gradients(self, work: list[tuple[dict[str, Any], list[Tensor]]], lows: dict[Tensor, Tensor],
                         projected: dict[Tensor, Tensor]) -> bool:
        """Whether the step may go on: sparse gradients raise; non-finite ones follow the
        ``nonfinite`` policy (one fused check over every gradient the step reads, or the
        projection ``projected`` of it: :meth:`_screening_projections`), after the weights are
        checked (a non-finite one raises) and up to ``max_consecutive_skips``."""
        params = [p for _, group_params in work for p in group_params]
        moved = next((p for group, group_params in work if group.get("layout") == "kernel"
                      for p in group_params if not p.is_contiguous()), None)
        if moved is not None:
            raise RuntimeError(f"{self._name(moved)} can no longer be viewed as its out × (in·k…) matrix in place (its "
                               "memory format changed after the optimizer was built, e.g. to channels_last); nothing "
                               "was updated. Keep conv weights contiguous")
        sparse = next((p for p in params if p not in lows and p.grad.is_sparse), None)
        if sparse is not None:
            raise RuntimeError(f"LowRankOptimizer does not support sparse gradients ({self._name(sparse)}); use a "
                               "dense embedding (sparse=False) or give that parameter its own torch optimizer.")
        groups = {p: group for group, group_params in work for p in group_params}
        guarded = [p for p in params if groups[p]["nonfinite"] != "ignore"]
        checked = [(p, projected.get(p, here) if t is p.grad else here, here)
                   for p in guarded for t in (lows.get(p), p.grad) if t is not None
                   for here in [self._placements[p].local(t)]]
        bad = self._placements.agreed(first_nonfinite([t for _, t, _ in checked], [s for _, _, s in checked]),
                                      len(checked))
        if bad is None:
            return True
        self._refuse_nonfinite_weight(guarded)
        p, group = checked[bad][0], groups[checked[bad][0]]
        message = f"non-finite gradient in {self._name(p)}"
        if group["nonfinite"] == "raise":
            raise FloatingPointError(f"{message}; no parameter was updated (set nonfinite: skip to skip such steps)")
        self.skipped_steps += 1
        for q in params:
            self._skip_streaks[q] = self._skip_streaks.get(q, 0) + 1
        bound, streak = group["max_consecutive_skips"], self._skip_streaks[p]
        if bound is not None and streak > bound:
            raise FloatingPointError(
                f"{message}: its update was skipped {streak} times in a row, more than max_consecutive_skips={bound}, "
                "so training is not recovering; nothing was updated. Find where the loss or gradients overflow (lower "
                "lr, bf16 rather than fp16, clip gradients) and resume from a checkpoint, or raise "
                "max_consecutive_skips (None: no bound).")
        warnings.warn(f"{message}: step skipped, nothing updated ({self.skipped_steps} skipped so far)",
                      RuntimeWarning, stacklevel=3)
        return False

    def _refuse_nonfinite_weight(self, params: list[Tensor]) -> None:
        """Raise if one of ``params`` holds NaN/inf itself: every later gradient would be
        non-finite too, so skipping steps could never recover (checked on a bad step only)."""
        bad = next((i for i, p in enumerate(params) if first_nonfinite([float_weight(self._local(p)[0])]) is not None),
                   None)
        bad = self._placements.agreed(bad, len(params))
        if bad is not None:
            raise FloatingPointError(
                f"weight {self._name(params[bad])} is non-finite (not its gradient): the model is corrupted (an fp16 "
                "overflow, a faulty update or a corrupted checkpoint), and skipping steps cannot recover it; nothing "
                "was updated. Restore a checkpoint saved before it (optim/skipped_steps shows when steps began to be "
                "skipped), then lower lr, train in bf16 rather than fp16, or clip gradients.")

    def _local(self, p: Tensor) -> tuple[Tensor, Tensor | None]:
        """This rank's part of ``p`` and of its gradient (its placement's local tensors)."""
        placement = self._placements[p]
        return placement.local(p), placement.local(p.grad)

    def _name(self, p: Tensor) -> str:
        """``p``'s name in its group's ``names`` (``build_optimizer`` sets them), else its index."""
        for group in self.param_groups:
            for q, name in zip(group["params"], group.get("names", ())):
                if q is p:
                    return name
        return f"parameter {self._index.get(p, '?')}"

    def _refresh_subspaces(self, work: list[tuple[dict[str, Any], list[Tensor]]], lows: dict[Tensor, Tensor],
                           share: bool = True) -> dict[Tensor, tuple[Tensor | None, Tensor | None] | None]:
        """Refresh every projector due this step, before anything else changes (a refresh that
        fails — an SVD that does not converge — is undone with the rest of the step: the journal
        of :meth:`_step_all` recorded each projector due and each slot made, in
        :meth:`_record_subspaces`). Under refresh sharing
        (:mod:`~lit_lowrank.optim.refresh_sharing`) each shared weight is refreshed by one rank and
        its projector's state sent to the others (unless ``share`` is False: a layer-wise step); a
        failure on any rank is raised on every rank.

        Returns ``{param: its bases before the refresh (None at the first)}`` for the refreshed ones.
        """
        due = self._due_refreshes(work, lows)
        old_bases = {p: slot.projector.bases() if slot.projector.refreshes else None for p, slot, _ in due}
        shared = self._shared_refresh(due) if share else None
        for p, slot, group in due:
            index = shared[1].get(p) if shared else None
            self._refresh_one(p, slot, group, lows, None if index is None else (shared[0], index))
        if shared:
            shared[0].exchange()
            self._refresh_sent += shared[0].sent
        return old_bases

    def _due_refreshes(self, work: list[tuple[dict[str, Any], list[Tensor]]], lows: dict[Tensor, Tensor],
                       ) -> list[tuple[Tensor, LowRankSlot, dict[str, Any]]]:
        """The low-rank weights whose schedule refreshes them this step, with their slots (made
        now for a first step) and groups, in parameter order."""
        due = []
        for group, params in work:
            if not group["lowrank"]:
                continue
            for p in params:
                slot, state = self._slot(p, group), self.state.get(p, {})
                if not slot.schedule.should_refresh(int(state["step"]) if "step" in state else 0):
                    continue
                if p in lows and slot.projector.needs_gradient:
                    raise RuntimeError("a projected gradient was given for a step that refreshes the subspace; "
                                       "check needs_full_gradient() before projecting")
                due.append((p, slot, group))
        return due

    def _shared_refresh(self, due: list[tuple[Tensor, LowRankSlot, dict[str, Any]]],
                        ) -> tuple[SharedRefresh, dict[Tensor, int]] | None:
        """The step's shared refreshes and each shared weight's index among them, or None when
        no weight due is shared (:meth:`_shares_refresh`)."""
        chosen = [(p, slot) for p, slot, group in due
                  if shares_refresh(group, slot.projector, self.gradients_identical or slot.placement.identical_gradients)]
        if not chosen:
            return None
        costs = [slot.view.shape.numel() for _, slot in chosen]
        sharing = SharedRefresh([slot.projector for _, slot in chosen], costs, self._local(chosen[0][0])[0].device)
        return sharing, {p: index for index, (p, _) in enumerate(chosen)}

    def _refresh_one(self, p: Tensor, slot: LowRankSlot, group: dict[str, Any], lows: dict[Tensor, Tensor],
                     shared: tuple[SharedRefresh, int] | None) -> None:
        """Refresh ``p``'s projector from its whole gradient ``G`` (``G + λW`` for coupled L2) —
        unless another rank owns this shared refresh (a gradient split by rows is then gathered
        on its owner only: every rank holding rows of it takes part). A shared refresh that
        fails is kept for the exchange instead of raised."""
        projector, placement = slot.projector, slot.placement
        mine = shared is None or shared[0].mine(shared[1])
        if not mine and not placement.joins_gathers:
            return
        if p in lows or not placement.reads_gradient(projector):
            grad = shape_only(slot.view.shape, p)
        else:
            weight, local_grad = self._local(p)
            grad = slot.whole_gradient(l2_gradient(local_grad, weight, group),
                                       None if shared is None else shared[0].owner[shared[1]])
        if not mine:
            return
        try:
            projector.refresh(grad)
            check_bases(projector, grad, group["rank"], group["projector"])
        except Exception as error:
            if shared is None:
                raise
            shared[0].failed(error)

    def _dense_step(self, group: dict[str, Any], params: list[Tensor], journal: StepJournal, *,
                    copies: bool = True) -> None:
        """Step a dense group, recording in ``journal`` what it changes: its weights and moments,
        or, without ``copies``, only its step counters and new states (for the step's last update:
        see :meth:`_step_all`)."""
        inner = self._dense_inner(group)
        if inner is not None:
            return self._inner_dense_step(group, params, inner, journal)
        tensors, grads = map(list, zip(*(self._local(p) for p in params)))
        fused = all(t.device.type in ("cpu", "cuda") and t.is_floating_point() for t in tensors)
        states = []
        for p, tensor in zip(params, tensors):
            fresh = "step" not in self.state.get(p, {})
            if copies or fresh:
                journal.entry(self.state, p)
            if copies:
                journal.tensor(tensor)
            state = self.state[p]
            if fresh:
                state["step"] = torch.zeros((), dtype=torch.float32, device=tensor.device if fused else "cpu")
                state["exp_avg"] = torch.zeros_like(tensor, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(tensor, memory_format=torch.preserve_format)
            elif fused and state["step"].device != tensor.device:  # torch loads steps onto the CPU
                state["step"] = state["step"].to(tensor.device)
            journal.tensor(state["step"])
            states.append(state)
        beta1, beta2 = group["betas"]
        adam_functional(
            tensors, grads, [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states],
            foreach=None if fused else True, fused=fused or None, amsgrad=False, beta1=beta1,
            beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
            maximize=False, decoupled_weight_decay=group.get("decoupled_weight_decay", True),
        )

    def _dense_inner(self, group: dict[str, Any]) -> InnerOptimizer | None:
        """The group's inner optimizer if it steps dense params too (``InnerOptimizer.steps_dense``:
        SGD, the peers' HF AdamW), else None (torch's AdamW/Adam)."""
        if not plugins.get_inner_optimizer(group["inner"]).steps_dense:
            return None
        return self._group_components(group)[0]

    def _inner_dense_step(self, group: dict[str, Any], params: list[Tensor], inner: InnerOptimizer,
                          journal: StepJournal) -> None:
        """Dense params stepped by ``inner`` on their full gradients:
        ``W ← W − η · step_size_factor(t) · N`` with ``N = inner.directions(G)``; weight decay
        coupled into ``G`` or decoupled (before or after the update, where ``inner`` puts it)."""
        lr, decay = group["lr"], group["weight_decay"]
        by_step: dict[int, list[tuple[Tensor, Tensor, dict]]] = defaultdict(list)
        for p in params:
            journal.entry(self.state, p)
            state, (weight, grad) = self.state[p], self._local(p)
            journal.tensor(weight)
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state.update(inner.init_state(weight))
            state["step"] += 1
            by_step[int(state["step"])].append((weight, l2_gradient(grad, weight, group), state))
        decoupled = group.get("decoupled_weight_decay", True)
        for step, items in by_step.items():
            directions = inner.directions([grad for _, grad, _ in items], [s for _, _, s in items], step)
            for (weight, _, _), direction in zip(items, directions):
                with decoupled_decay(weight, lr, decay if decoupled else 0.0, after=inner.decay_after_step):
                    weight.add_(direction, alpha=-lr * inner.step_size_factor(step))

    def _lowrank_step(self, group: dict[str, Any], params: list[Tensor], lows: dict[Tensor, Tensor],
                      projected: dict[Tensor, Tensor], old_bases: dict[Tensor, tuple[Tensor | None, Tensor | None] | None], journal: StepJournal,
                      deferred: list[Deferred], later: list[LaterUpdates]) -> None:
        """Compute the updates of a low-rank group (moments, directions, rules), recording in
        ``journal`` what changes. A rule with ``lifts_only``, on a weight held whole as a float
        tensor and a projector that lifts as the base class does, writes last: its lifts go to
        ``deferred`` for :meth:`_write_weights`; and where its inner optimizer
        ``fails_only_out_of_memory`` and the step neither starts nor refreshes the weight, its
        moments are advanced there too (``later``), so they are not copied. Any other rule is
        applied now, its weight copied first."""
        inner, rule = self._group_components(group)
        by_step: dict[int, list[LowRankUpdate]] = defaultdict(list)
        for p in params:
            slot, fresh = self._slots[p], "step" not in self.state.get(p, {})
            lifts = rule.lifts_only and stored_weight(p) is None and applies_bases_plainly(type(slot.projector))
            moments_later = (lifts and inner.fails_only_out_of_memory and not fresh and p not in old_bases
                             and not slot.placement.sharded)
            if moments_later:
                journal.tensor(self.state[p]["step"])  # nothing else of its state changes before the apply phase
            else:
                journal.entry(self.state, p)  # before self.state[p] makes an entry
            state = self.state[p]
            step = 0 if fresh else int(state["step"])
            weight, local_grad = self._local(p)
            view = slot.local_view(weight)
            grad = None if p.grad is None else view(l2_gradient(local_grad, weight, group))
            if p in lows:
                low = l2_projection(lows[p], p, slot, group)
            else:
                low = projected[p] if p in projected else slot.applied.project(grad)
            part = slot.state_part(low)
            if p in old_bases:
                self._after_refresh(old_bases[p], slot, state, inner, group, step, part)
            if fresh:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state.update(inner.init_state(part))
            state["step"] += 1
            by_step[step + 1].append(LowRankUpdate(p, weight, view, slot, state, grad, low, part, lifts, moments_later))
        decay = group["weight_decay"] if group.get("decoupled_weight_decay", True) else 0.0
        for step, updates in by_step.items():
            now = [update for update in updates if not update.moments_later]
            if len(now) < len(updates):
                later.append(LaterUpdates(inner, rule, step, group["lr"], decay,
                                          [update for update in updates if update.moments_later]))
            if not now:
                continue
            directions = inner.directions([update.part for update in now], [update.state for update in now], step)
            for update, direction in zip(now, directions):
                if update.lifts:
                    lifts = DeferredLifts(update.slot.applied, update.view.weight(update.target))
                    inputs = replace(update.inputs(direction), projector=lifts)
                    rule.apply_(lifts.weight, inputs, step_size=group["lr"] * inner.step_size_factor(step))
                    deferred.append((update.p, lifts, update.target, group["lr"], decay, inner.decay_after_step))
                    continue
                record_weight(journal, update.p, update.target)
                weight = float_weight(update.target)
                update.apply_rule(rule, inner, direction, step, group["lr"], decay, weight)
                if weight is not update.target:
                    stored_weight(update.p).store_(weight)

    def _after_refresh(self, old: tuple[Tensor | None, Tensor | None] | None, slot: LowRankSlot, state: dict,
                       inner: InnerOptimizer, group: dict[str, Any], step: int, low: Tensor) -> None:
        """Adapt the moments (``on_refresh``) and the schedule to a basis :meth:`_refresh_subspaces`
        changed: ``keep`` leaves the moments as they are (the papers' code), ``reset`` restarts them
        from the inner optimizer's fresh state for ``low`` (the step count goes on), ``rotate``
        hands the inner optimizer the maps ``L_newᵀ L_old`` and ``Q_newᵀ Q_old``. A basis of
        another shape than the last (a projector whose rank r′ changes) always resets them: moments
        of the old shape cannot be kept or rotated (:meth:`_reset_reshaped`)."""
        similarity = None
        if old is not None:
            new = slot.projector.bases()
            similarity = leading_similarity(old, new)
            if "step" in state and basis_shapes(old) != basis_shapes(new):
                self._reset_reshaped(slot, state, inner, group, old, new, low)
            elif "step" in state and group["on_refresh"] == "reset":
                state.update(inner.init_state(low))
            elif "step" in state and group["on_refresh"] == "rotate":
                inner.rotate(state, *(None if n is None else n.mT @ o for o, n in zip(old, new)))
        slot.schedule.after_refresh(step, similarity)
        self.refresh_count += 1

    def _reset_reshaped(self, slot: LowRankSlot, state: dict, inner: InnerOptimizer, group: dict[str, Any],
                        old: tuple[Tensor | None, ...], new: tuple[Tensor | None, ...], low: Tensor) -> None:
        """Restart the moments of a weight whose projector returned bases of another shape (its
        rank changed) from the inner optimizer's fresh state for ``low`` (the step count goes on);
        with ``on_refresh`` keep or rotate, which cannot apply, warn once per weight."""
        state.update(inner.init_state(low))
        if group["on_refresh"] != "reset" and not slot.warned_reshape:
            slot.warned_reshape = True
            p = next(q for q, s in self._slots.items() if s is slot)
            warnings.warn(f"projector {group['projector']!r} changed the bases of {self._name(p)} from "
                          f"{basis_shapes(old)} to {basis_shapes(new)} (rank changed) at a refresh; its moments "
                          f"were reset, as on_refresh={group['on_refresh']!r} cannot carry moments to another "
                          "shape (set on_refresh: reset to silence this)", UserWarning, stacklevel=5)

    # ------------------------------------------------------------------ state
    @property
    def projectors(self) -> dict[Tensor, Projector]:
        """The projector of each low-rank weight that has been stepped, by parameter."""
        return {p: slot.projector for p, slot in self._slots.items()}

    def state_bytes(self) -> dict[str, int]:
        """Bytes of optimizer state by role: ``moments`` (low-rank moments and rule state),
        ``projectors`` (bases, indices, packed bases, cached regenerable bases: ``resident_bytes``),
        ``dense`` (AdamW moments of dense params).
        Scalar bookkeeping (step counters, sides, seeds) is not counted."""
        sizes = {"moments": 0, "projectors": 0, "dense": 0}
        for group in self.param_groups:
            role = "moments" if group["lowrank"] else "dense"
            for p in group["params"]:
                sizes[role] += tensor_bytes(self.state.get(p, {}))
        for slot in self._slots.values():
            sizes["projectors"] += slot.projector.resident_bytes()
        return sizes


def basis_shapes(bases: tuple[Tensor | None, ...]) -> tuple[tuple[int, ...] | None, ...]:
    """The shape of each basis (None for a side without one): what shapes a weight's moments."""
    return tuple(None if basis is None else tuple(basis.shape) for basis in bases)


def record_weight(journal: StepJournal, p: Tensor, target: Tensor) -> None:
    """Record, before an update, the values of ``p``'s weight: ``target`` (``p`` or this rank's
    rows of it), or the state of its :func:`~lit_lowrank.transforms.base.stored_weight` (codes,
    scales, rounding counter)."""
    store = stored_weight(p)
    if store is None:
        journal.tensor(target)
    else:
        journal.stateful(store)


def float_weight(p: Tensor) -> Tensor:
    """The tensor an update is applied to: ``p`` itself, or, for a parameter whose values live
    elsewhere (a :func:`~lit_lowrank.transforms.base.stored_weight` such as an INT8
    ``QuantizedLinear``; Q-GaLore §3.4), a float copy ``store.float_weight()`` that
    ``store.store_(weight)`` re-quantizes after the update."""
    store = stored_weight(p)
    return p if store is None else store.float_weight()


def l2_gradient(grad: Tensor | None, p: Tensor, group: dict[str, Any]) -> Tensor | None:
    """``G + λW`` for coupled L2 weight decay (``decoupled_weight_decay=False``: torch Adam, SGD),
    else ``G`` itself."""
    decay = group["weight_decay"]
    if grad is None or not decay or group.get("decoupled_weight_decay", True):
        return grad
    return grad.add(float_weight(p).to(grad.dtype), alpha=decay)


def l2_projection(low: Tensor, p: Tensor, slot: LowRankSlot, group: dict[str, Any]) -> Tensor:
    """``R + λ P(W)``: the projection of ``G + λW`` from a given projection ``R`` of ``G``
    (layer-wise accumulation), the projection being linear."""
    decay = group["weight_decay"]
    if not decay or group.get("decoupled_weight_decay", True):
        return low
    return low.add(slot.projector.project(slot.view(float_weight(p).to(low.dtype))), alpha=decay)


def leading_similarity(old: tuple[Tensor | None, ...], new: tuple[Tensor | None, ...]) -> float:
    """|cos| between the first basis vectors of two bases (sign-invariant: SVD signs are
    arbitrary); for stacked bases the smallest over the stack (the subspace that moved most)."""
    old_basis, new_basis = (old[0], new[0]) if old[0] is not None else (old[1], new[1])
    cosine = F.cosine_similarity(old_basis[..., :, 0].float(), new_basis[..., :, 0].float(), dim=-1)
    return cosine.abs().min().item()


def tensor_bytes(value: Any) -> int:
    """Storage bytes of the non-scalar tensors in ``value`` (a tensor or nested dicts of them);
    0-dim bookkeeping (steps, sides, seeds) counts nothing."""
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, Tensor) and value.ndim > 0:
        return value.numel() * value.element_size()
    return 0
