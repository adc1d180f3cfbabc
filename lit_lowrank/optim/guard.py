"""What a step may consume: gradients checked for every parameter before anything changes.

A step either updates every parameter or none (``LowRankOptimizer.step``): sparse and
non-finite gradients are found here, for all param groups at once, before a moment, a
projector, a counter or a weight is touched. The policy for non-finite values is the param
groups' ``nonfinite`` option:

* ``skip`` (default) — the whole step is skipped and counted (``optimizer.skipped_steps``), with
  a warning naming the first offending parameter;
* ``raise`` — ``FloatingPointError`` naming it;
* ``ignore`` — no check: NaN/inf flow into the moments, projectors and weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

NONFINITE = ("skip", "raise", "ignore")


def check_nonfinite_option(value: Any) -> None:
    if value not in NONFINITE:
        raise ValueError(f"nonfinite={value!r}; expected one of {NONFINITE}")


def first_nonfinite(tensors: list[Tensor]) -> int | None:
    """Index of the first tensor holding a NaN or ±inf, or None: one fused max-|x| per tensor
    (``_foreach_norm`` with ``ord=inf`` never overflows and propagates NaN) and one host sync."""
    if not tensors:
        return None
    peaks = torch._foreach_norm(tensors, float("inf"))
    finite = torch.stack([peak.float().to(tensors[0].device) for peak in peaks]).isfinite()
    if bool(finite.all()):
        return None
    return int((~finite).nonzero()[0])
