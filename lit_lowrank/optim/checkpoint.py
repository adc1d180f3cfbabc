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
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor

STATE_LAYOUT = ("rank", "projector", "side", "rule", "inner", "schedule", "projector_args", "inner_args")
"""Options of low-rank groups whose saved state cannot carry over to another value."""

DENSE_OPTIONS = ("betas", "eps", "weight_decay", "nonfinite")
"""The options that matter for a dense (AdamW) group."""

SCHEDULER_OWNED = ("lr", "initial_lr")


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
        relevant = options if now["lowrank"] else set(DENSE_OPTIONS)
        for key in sorted(relevant - set(SCHEDULER_OWNED)):
            if key not in then or _same(then[key], now[key]):
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
