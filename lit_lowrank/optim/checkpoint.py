"""Checking a saved ``LowRankOptimizer`` state against the optimizer that loads it, and the one
rule for the dtype its tensors come back in.

A state that does not fit is refused before anything changes: loading moments of another shape
would run the fused AdamW kernel out of bounds, and a changed target list would train a step on
the wrong layer. Options are compared group by group:

* options that shape the state (:data:`STATE_LAYOUT`) must be equal — refused otherwise;
* every other optimizer option takes **this run's value** (what the user asks for now), with a
  warning listing each difference;
* ``lr``, ``initial_lr`` and keys the optimizer does not own (added by LR schedulers) take the
  checkpoint's value, as ``torch.optim.Optimizer.load_state_dict`` does: schedulers own them.

Each saved low-rank group also records its components (:data:`COMPONENTS`: the projector, rule,
inner optimizer, schedule and quantizers named in ``projector_args``/``inner_args``) by
qualified name and class (:func:`component_record`); a resume needs the same classes, under
whichever names this run gives them (``lit_lowrank/plugins.py``), and refuses another class
naming both. Checkpoints without the record compare the names, a qualified name matching the
bare name it qualifies.

:class:`CheckpointMapping` is the optimizer's ``state_dict``/``load_state_dict``: it maps each
weight's state through its placement (distributed on save, localized on load) and runs these
checks before anything changes.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import Tensor

from lit_lowrank import plugins
from lit_lowrank.optim.sharding import map_tensors
from lit_lowrank.options import component_kinds, defaults, having

if TYPE_CHECKING:
    from lit_lowrank.optim.placement import LowRankSlot

STATE_LAYOUT = having("state")
"""Options of low-rank groups whose saved state cannot carry over to another value."""

SCHEDULER_OWNED = ("lr", "initial_lr")

DENSE_OPTIONS = tuple(name for name in having("dense") if name not in SCHEDULER_OWNED)
"""The options that matter for a dense (AdamW) group, checked on resume."""

COMPONENTS = component_kinds()
"""The options of a low-rank group that name a registered component, with its kind."""
QUANTIZED_ARGS = ("projector_args", "inner_args")
"""The options whose ``quantizer`` entry may name a registered quantizer."""
RECORD_KEY = "components"
"""The key of a saved param group that holds :func:`component_record`."""


def named_components(group: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """``(option, name, kind)`` of each registered component a low-rank group names; a
    quantizer's option is ``"<args option>.quantizer"``."""
    for option, kind in COMPONENTS.items():
        yield option, group[option], kind
    for option in QUANTIZED_ARGS:
        quantizer = (group.get(option) or {}).get("quantizer")
        if isinstance(quantizer, str):
            yield f"{option}.quantizer", quantizer, "quantizers"


def component_record(group: dict[str, Any]) -> dict[str, dict[str, str]]:
    """What a checkpoint keeps of a low-rank group's components: by option, the qualified name
    (``<package>:<name>``) and the class (``<module>.<qualname>``)."""
    return {option: {"name": plugins.qualified_name(kind, name), "class": plugins.class_path(plugins.get(kind, name))}
            for option, name, kind in named_components(group)}


def check_components(label: str, group: dict[str, Any], record: dict[str, dict[str, str]]) -> None:
    """Raise a ValueError unless ``group`` names components of the classes ``record``
    (:func:`component_record` of the saved group) holds, option by option."""
    current = {option: (name, kind) for option, name, kind in named_components(group)}
    for option in sorted(set(current) | set(record)):
        name, kind = current.get(option, (None, "quantizers"))
        saved = record.get(option)
        found = None if name is None else plugins.class_path(plugins.get(kind, name))
        if saved is None or found != saved["class"]:
            raise ValueError(_component_refusal(label, option, saved, name, found, kind))


def _component_refusal(label: str, option: str, saved: dict[str, str] | None, name: str | None,
                       found: str | None, kind: str) -> str:
    """The message for a component whose class is not the checkpoint's, naming both and the fix."""
    then = "none" if saved is None else f"{saved['name']!r} ({saved['class']})"
    now = "none" if name is None else f"{name!r} ({found})"
    message = (f"{label}: the checkpoint was saved with {option}={then}, this optimizer has {now}; its state cannot "
               "carry over.")
    if saved is None:
        return f"{message} Resume without {option}, or start the optimizer fresh (load only the model weights)."
    usable = next((candidate for candidate in (saved["name"].split(":", 1)[-1], saved["name"])
                   if _class_of(kind, candidate) == saved["class"]), None)
    if usable is not None:
        return (f"{message} Resume with {option}: {usable!r}, or start the optimizer fresh (load only the model "
                "weights).")
    registered_now = _class_of(kind, saved["name"])
    fate = "is not installed" if registered_now is None else f"is now {registered_now}"
    return (f"{message} {saved['name']!r} {fate}: install the package that provides {saved['class']} and resume "
            f"with {option}: {saved['name']!r}, or start the optimizer fresh (load only the model weights).")


def _class_of(kind: str, name: str) -> str | None:
    """The class path of the component ``name`` resolves to now; None if it does not resolve."""
    try:
        return plugins.class_path(plugins.get(kind, name))
    except plugins.UnknownComponentError:
        return None


def group_label(index: int, group: dict[str, Any]) -> str:
    names = group.get("names") or ()
    return f"param group {index}" + (f" ({names[0]}, ...)" if names else "")


def merge_groups(current: list[dict[str, Any]], saved: list[dict[str, Any]], options: set[str],
                 ) -> list[dict[str, Any]]:
    """The param groups to load: ``saved`` with the ``options`` this run sets taken from
    ``current`` (except :data:`SCHEDULER_OWNED`), and ``current``'s ``names``.

    Raises:
        ValueError: other group count, sizes or parameter names, a group low-rank in one and dense in the other,
            or a :data:`STATE_LAYOUT` option that differs.
    """
    if len(saved) != len(current):
        raise ValueError(f"the optimizer checkpoint has {len(saved)} param groups, this optimizer "
                         f"{len(current)}; build it with the same targets/exclude (and frozen layers) as the run "
                         "that saved it.")
    merged, changes = [], []
    for index, (now, then) in enumerate(zip(current, saved)):
        label = group_label(index, now)
        if len(then["params"]) != len(now["params"]):
            raise ValueError(f"{label} has {len(now['params'])} parameters but {len(then['params'])} in the "
                             "checkpoint; build the optimizer with the same targets/exclude as the run that saved it.")
        if "names" in then and "names" in now and list(then["names"]) != list(now["names"]):
            raise ValueError(f"{label} holds {_differing(now['names'], then['names'])}; build the optimizer "
                             "with the same targets/exclude as the run that saved it.")
        if bool(then.get("lowrank", False)) != bool(now["lowrank"]):
            raise ValueError(f"{label} is {'low-rank' if now['lowrank'] else 'dense'} here but not in the checkpoint; "
                             "use the same targets/exclude as the run that saved it.")
        then = dict(then)
        record = then.pop(RECORD_KEY, None)
        if now["lowrank"] and record is not None:
            check_components(label, now, record)
        relevant = options if now["lowrank"] else set(DENSE_OPTIONS)
        for key in sorted(relevant - set(SCHEDULER_OWNED)):
            if key not in then and now["lowrank"] and key in STATE_LAYOUT:
                then[key] = defaults((key,))[key]  # saved before the option existed: with its default
            if key not in then or _same_option(key, then[key], now[key], record):
                continue
            if now["lowrank"] and key in STATE_LAYOUT:
                raise ValueError(f"{label}: the checkpoint was saved with {key}={then[key]!r}, this optimizer has "
                                 f"{now[key]!r}; its state cannot carry over. Resume with {key}: {then[key]!r}, "
                                 "or start the optimizer fresh (load only the model weights).")
            changes.append(f"{label} {key}: {then[key]!r} -> {now[key]!r}")
        group = {**then, **{k: now[k] for k in options - set(SCHEDULER_OWNED) if k in now}}
        if "names" in now:
            group["names"] = now["names"]
        merged.append(group)
    if changes:
        warnings.warn("resuming with options other than the checkpoint's; this run's values are used: "
                      + "; ".join(changes), UserWarning, stacklevel=3)
    return merged


def _differing(now: list[str], then: list[str]) -> str:
    """The first parameter names that differ, for an error message."""
    first = next(i for i, (a, b) in enumerate(zip([*now, None], [*then, None])) if a != b)
    return f"{now[first:first + 3]} here but {then[first:first + 3]} in the checkpoint"


def _same_option(key: str, saved: Any, current: Any, record: dict[str, dict[str, str]] | None) -> bool:
    """Whether option ``key`` means here what it meant in the checkpoint: component names by
    class where the checkpoint records them (:func:`check_components` did), else by
    :func:`_same_component`; other values by equality."""
    if key in COMPONENTS:
        return record is not None or _same_component(COMPONENTS[key], saved, current)
    if key in QUANTIZED_ARGS:
        quantizers = saved.get("quantizer"), current.get("quantizer")
        if all(isinstance(name, str) for name in quantizers):
            unnamed = [{**args, "quantizer": None} for args in (saved, current)]
            return (record is not None or _same_component("quantizers", *quantizers)) and _same(*unnamed)
    return _same(saved, current)


def _same_component(kind: str, saved: str, current: str) -> bool:
    """For a checkpoint without a component record: whether its name ``saved`` means the
    component ``current`` names — the same one now, or, for a name that no longer resolves (since
    become ambiguous), a qualified name of it (``pkg:name`` for ``name``)."""
    try:
        return plugins.get(kind, saved) is plugins.get(kind, current)
    except plugins.UnknownComponentError:
        return saved.split(":")[-1] == current.split(":")[-1]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def projected_shape(name: str, shape: tuple[int, ...], left: Tensor | None, right: Tensor | None,
                    ) -> tuple[int, ...]:
    """The shape of ``R`` for a weight of ``shape`` (m×n, or E×m×n) with bases ``left`` (m×r)
    and ``right`` (n×r; per slice E× each, or shared, for a stack); raises a ValueError naming the parameter if the
    bases are for another shape."""
    *batch, m, n = shape
    fits = all(basis is None or tuple(basis.shape[:-1]) in ((*batch, rows), (rows,))  # per slice, or shared
               for basis, rows in ((left, m), (right, n)))
    if not fits:
        found = ", ".join(f"{side} {None if basis is None else tuple(basis.shape)}"
                          for side, basis in (("left", left), ("right", right)))
        raise ValueError(f"the checkpoint's projector of {name} has bases ({found}) for another shape than its "
                         f"{'×'.join(map(str, shape))} weight; load it into a model with the same layers "
                         "(targets/exclude) as the run that saved it.")
    return (*batch, left.shape[-1] if left is not None else m, right.shape[-1] if right is not None else n)


def core_shape(name: str, shape: tuple[int, ...], factors: tuple[Tensor, ...]) -> tuple[int, ...]:
    """The core's shape for a weight of ``shape`` with one basis per mode (d_k×r_k, a tensor
    projector's); raises a ValueError naming the parameter if the bases are for another shape."""
    if tuple(factor.shape[0] for factor in factors) != tuple(shape):
        found = ", ".join(str(tuple(factor.shape)) for factor in factors)
        raise ValueError(f"the checkpoint's projector of {name} has bases ({found}) for another shape than its "
                         f"{'×'.join(map(str, shape))} weight; load it into a model with the same layers "
                         "(targets/exclude) as the run that saved it.")
    return tuple(factor.shape[1] for factor in factors)


def check_state(name: str, saved: dict[str, Any], expected: dict[str, Any]) -> None:
    """Every state entry ``expected`` holds (fresh state of the right layout) is in ``saved``
    with the same structure and shapes; raises a ValueError naming the parameter otherwise."""
    for key, want in expected.items():
        got = saved.get(key)
        problem = _mismatch(got, want)
        if problem:
            raise ValueError(f"the checkpoint's optimizer state {key!r} of {name} {problem}; load it into a model "
                             "and optimizer with the same targets, rank, side and inner optimizer as the run that "
                             "saved it, or start the optimizer fresh.")


def _mismatch(got: Any, want: Any) -> str | None:
    if got is None:
        return "is missing"
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return "is a plain tensor where packed (quantized) state is expected"
        return next((problem for k, w in want.items() if (problem := _mismatch(got.get(k), w))), None)
    if isinstance(got, dict):
        return "is packed (quantized) where a plain tensor is expected"
    if isinstance(want, Tensor) and tuple(got.shape) != tuple(want.shape):
        return f"has shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    return None


def restore_state(saved: dict[str, Any], param: Tensor, *, follows_param: bool) -> dict[str, Any]:
    """How saved state comes back for ``param`` — the one rule (torch's own load casts every
    floating tensor to the parameter's dtype, which rounds float32 statistics of bf16 weights):

    * ``step`` counters stay as saved (torch does the same);
    * with ``follows_param`` (dense AdamW moments: torch's kernel wants them in the parameter's
      dtype) floating tensors take the parameter's dtype;
    * every other tensor, and everything nested in dicts (packed 8-bit moments, limiter norms),
      keeps its saved dtype — Adafactor's float32 statistics of a bf16 weight stay float32.

    Tensors are copied onto the parameter's device.
    """
    restored = {}
    for key, value in saved.items():
        if isinstance(value, dict):
            restored[key] = restore_state(value, param, follows_param=False)
        elif not isinstance(value, Tensor):
            restored[key] = value
        elif key == "step":
            restored[key] = value.clone()
        elif follows_param and value.is_floating_point():
            restored[key] = value.to(device=param.device, dtype=param.dtype, copy=True)
        else:
            restored[key] = value.to(device=param.device, copy=True)
    return restored


class CheckpointMapping:
    """A :class:`~lit_lowrank.optim.lowrank.LowRankOptimizer`'s state dict and its loading: the
    projectors' and schedules' state beside torch's, each weight's state distributed over the
    ranks by its placement on save and localized on load (:mod:`~lit_lowrank.optim.placement`),
    and everything checked against this optimizer before anything changes (this module's
    checks). Mixed into the optimizer, whose groups, slots and placements it reads."""

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, in which each low-rank weight's entry also holds ``"subspace"``: its
        projector's and schedule's tensor-only state dicts, and each low-rank group ``"components"``:
        its components' qualified names and classes (:func:`component_record`); plus
        ``refresh_count``, ``skipped_steps`` and ``skip_streaks`` (updates skipped in a row, by parameter
        index). What a resume needs sits under ``state`` and ``param_groups``, the only
        keys torch's distributed checkpoint keeps (it then recounts ``refresh_count`` from the
        projectors and restarts ``skipped_steps`` and ``skip_streaks``). The state tensors of a weight split by rows
        across ranks (FSDP2) are DTensors of the whole, so that the checkpoint saves every rank's part."""
        state_dict = super().state_dict()
        packed = state_dict["state"]
        for p, placement in self._placements.items():
            if (index := self._index[p]) in packed:
                packed[index] = placement.distributed(packed[index], self._state_split(p))
        for p, slot in self._slots.items():
            index = self._index[p]
            subspace = {"projector": slot.projector.state_dict(), "schedule": slot.schedule.state_dict()}
            # contiguous: torch's full-state broadcast sends a strided basis (a slice of U) scrambled
            packed[index] = {**packed.get(index, {}), "subspace": map_tensors(subspace, Tensor.contiguous)}
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            if group["lowrank"]:
                saved[RECORD_KEY] = component_record(group)
        state_dict["refresh_count"] = self.refresh_count
        state_dict["skipped_steps"] = self.skipped_steps
        state_dict["skip_streaks"] = {self._index[p]: streak for p, streak in self._skip_streaks.items()}
        return state_dict

    def _state_split(self, p: Tensor) -> tuple[int, int] | None:
        """The axis ``p``'s state tensors are split along over the ranks, and its length: a dense
        parameter's rows; None for a low-rank weight held whole."""
        slot = self._slots.get(p)
        return slot.state_split() if slot is not None else (0, p.shape[0])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`, after checking that it fits (see
        :mod:`lit_lowrank.optim.checkpoint`): groups, low-rank layout, every state tensor's and
        projector basis's shape; options that shape the state must match, others take this
        run's values (with a warning), ``lr``/``initial_lr`` the checkpoint's. State is keyed as
        the saved groups list their parameters (indices, or torch's distributed checkpoint's
        names); a sharded weight takes its rows or columns of saved DTensors or whole tensors.
        Nothing changes if it raises."""
        state_dict = dict(state_dict)
        keys = [key for group in state_dict["param_groups"] for key in group["params"]]
        position = {key: index for index, key in enumerate(keys)}
        subspaces = {int(index): entry for index, entry in state_dict.pop("lowrank", {}).items()}  # earlier format
        saved_state = {}
        for key, entry in state_dict.get("state", {}).items():
            entry = dict(entry)
            if "subspace" in entry:
                subspaces[position[key]] = entry.pop("subspace")
            if entry:
                saved_state[position[key]] = entry
        state_dict["state"] = {keys[index]: entry for index, entry in saved_state.items()}
        state_dict["param_groups"] = merge_groups(self.param_groups, state_dict["param_groups"],
                                                             set(self.defaults))
        slots = self._loaded_slots(subspaces, saved_state)
        refresh_count = int(state_dict.pop("refresh_count", sum(slot.projector.refreshes for slot in slots.values())))
        skipped_steps = int(state_dict.pop("skipped_steps", 0))
        streaks = {int(index): int(streak) for index, streak in state_dict.pop("skip_streaks", {}).items()}
        super().load_state_dict(state_dict)
        self._slots, self._components = slots, {}
        self.refresh_count, self.skipped_steps = refresh_count, skipped_steps
        groups = {p: group for group in self.param_groups for p in group["params"]}
        params = self._params()
        self._skip_streaks = {params[index]: streak for index, streak in streaks.items()}
        for index, saved in saved_state.items():
            p = params[index]
            saved = self._placements[p].localized(saved, self._state_split(p))
            self.state[p] = restore_state(saved, self._local(p)[0], follows_param=not groups[p]["lowrank"])

    def _loaded_slots(self, subspaces: dict[int, dict], saved_state: dict[int, dict]) -> dict[Tensor, LowRankSlot]:
        """Projectors and schedules rebuilt from the checkpoint's ``subspace`` entries, after
        checking every saved state tensor's shape against its parameter (ValueError naming it)."""
        params, slots = self._params(), {}
        groups = {p: group for group in self.param_groups for p in group["params"]}
        for index in sorted(set(subspaces) | set(saved_state)):
            p = params[index]
            group, name = groups[p], self._name(p)
            if not group["lowrank"]:
                if index in subspaces:
                    raise ValueError(f"the checkpoint has a projector for {name}, which is dense here; use the "
                                     "same targets/exclude as the run that saved it.")
                check_state(name, saved_state[index], self._dense_fresh_state(p, group))
                continue
            if index not in subspaces:
                raise ValueError(f"the checkpoint has optimizer state but no projector for {name}, which is "
                                 "low-rank here; use the same targets/exclude as the run that saved it.")
            slot = slots[p] = self._make_slot(p, group)
            try:
                slot.projector.load_state_dict(_to_device(subspaces[index]["projector"], p.device))
                slot.schedule.load_state_dict(subspaces[index]["schedule"])
                bases = slot.projector.bases()
            except (KeyError, RuntimeError, TypeError, ValueError) as error:
                raise ValueError(f"the checkpoint's projector/schedule state of {name} does not fit this "
                                 f"optimizer's ({group['projector']}, {group['schedule']}): {error}") from error
            low_shape = (core_shape(name, slot.view.shape, bases) if slot.projector.projects_tensors
                         else projected_shape(name, slot.view.shape, *bases))
            low = torch.zeros(low_shape, dtype=p.dtype)
            if index in saved_state:
                check_state(name, saved_state[index], self._group_components(group)[0].init_state(low))
        return slots

    def _dense_fresh_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        """The layout of a dense param's state (on the meta device): the group's inner
        optimizer's if it steps dense params (SGD, HF AdamW), else torch AdamW's two moments."""
        like = torch.empty(p.shape, device="meta")
        inner = self._dense_inner(group)
        if inner is not None:
            return inner.init_state(like)
        return {key: like for key in ("exp_avg", "exp_avg_sq")}


def _to_device(tree: Any, device: torch.device) -> Any:
    if isinstance(tree, Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: _to_device(v, device) for k, v in tree.items()}
    return tree
