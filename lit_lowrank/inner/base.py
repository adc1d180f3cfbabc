"""The InnerOptimizer contract: the moment update in low-rank space (docs/plugins.md).

An inner optimizer turns projected gradients ``R`` into normalized directions ``N`` (same
shape), keeping its moments in each parameter's optimizer state. It is called once per step
with every low-rank tensor that shares a step count, so implementations can use ``_foreach``
or fused kernels.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

class InnerOptimizer(ABC):
    """Base class. ``linear_state`` names the state tensors that transform like ``R`` (first
    moments); ``quadratic_state`` those that transform like ``R²`` (second moments).

    Built by the optimizer once per param group, offered the group's ``betas`` and ``eps`` only
    where the user set them (else your own defaults apply) and only if ``__init__`` accepts
    them; the user's ``inner_args`` come on top, with a ``quantizer`` name resolved to its class.
    Rebuilt when those options change. After building, a group whose ``betas``/``eps`` were unset
    shows your instance's ``betas``/``eps`` attributes.
    """

    linear_state: tuple[str, ...] = ()
    quadratic_state: tuple[str, ...] = ()
    decay_after_step: bool = False
    """Decoupled weight decay ``W ← W − η λ W`` applied to the *updated* weight (HF
    ``transformers.AdamW`` and the peers built on it) instead of before the update (torch)."""
    batched: bool = False
    """Whether the update is elementwise (or otherwise treats each slice of an E×r×n stack as
    its own matrix), so stacked experts (the ``experts`` layout) may use it; the optimizer
    refuses stacks otherwise."""
    elementwise: bool = False
    """Whether each entry of ``N`` depends only on the same entry of ``R`` and of the state (Adam,
    SGD, Lion), so a rank may step its block of a weight sharded by FSDP alone; the optimizer
    refuses sharded weights otherwise."""
    fails_only_out_of_memory: bool = False
    """Whether :meth:`directions` raises nothing on valid inputs but running out of memory (it
    runs torch kernels on its inputs and state, no checks of its own) and updates each tensor on
    its own (a step may call it with its tensors in two batches). A rule with
    ``UpdateRule.lifts_only`` then has the moments advanced in the step's apply phase, once the
    weights are written (:mod:`lit_lowrank.optim.deferred`), instead of copied first so that a
    failed step can be undone; validate options in ``__init__``."""
    steps_dense: bool = False
    """Dense groups naming this inner optimizer are stepped by it on their full gradients
    (``W ← W − η · step_size_factor(t) · N``) instead of by torch's AdamW: an optimizer family
    whose dense form is the same update (SGD; the peers' HF AdamW)."""

    def step_size_factor(self, step: int) -> float:
        """Multiplies the learning rate of step ``step`` for the whole update (after the rule);
        1 by default. HF's AdamW puts its bias correction ``√(1−β2ᵗ)/(1−β1ᵗ)`` here."""
        return 1.0

    @abstractmethod
    def init_state(self, low: Tensor) -> dict[str, Tensor]:
        """Fresh state tensors for a low-rank gradient shaped like ``low``."""

    @abstractmethod
    def directions(self, lows: list[Tensor], states: list[dict[str, Tensor]], step: int) -> list[Tensor]:
        """Update the moments with ``lows`` and return the directions ``N``.

        ``step`` is the 1-based step number after this update, equal for every tensor.
        """

    def rotate(self, state: dict[str, Tensor], left: Tensor | None, right: Tensor | None) -> None:
        """Map the moments onto a new basis (``on_refresh: rotate``; the optimizer itself does
        ``keep`` and ``reset``, the latter with :meth:`init_state`).

        ``left`` (r×r) = L_newᵀ L_old and ``right`` (r×r) = Q_newᵀ Q_old map old low-rank
        coordinates to new ones: ``R_new ≈ left · R_old · rightᵀ`` (None: that side has no
        basis). First moments (:attr:`linear_state`) are mapped exactly, second moments
        (:attr:`quadratic_state`) with the squared maps (exact for a diagonal covariance).
        """
        for key in self.linear_state:
            state[key].copy_(change_basis(state[key], left, right))
        for key in self.quadratic_state:
            squared = (None if left is None else left.square(), None if right is None else right.square())
            state[key].copy_(change_basis(state[key], *squared).clamp_(min=0))


def change_basis(low: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """``left · low · rightᵀ`` with either factor optional, in ``low``'s dtype (moments may be
    kept in another precision than the bases the maps come from)."""
    out = low if left is None else left.to(low.dtype) @ low
    return out if right is None else out @ right.to(low.dtype).mT


def bias_corrections(betas: tuple[float, float], step: int) -> tuple[float, float]:
    """Adam's ``(1 - β1^t, 1 - β2^t)``."""
    beta1, beta2 = betas
    return 1 - beta1**step, 1 - beta2**step


def zeros_like_state(low: Tensor, *keys: str) -> dict[str, Tensor]:
    return {key: torch.zeros_like(low, memory_format=torch.preserve_format) for key in keys}
