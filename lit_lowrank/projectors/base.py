"""The Projector contract: an m×n gradient to a low-rank tensor and back (docs/plugins.md).

A projector with ``batched = True`` also takes a stack of E gradients (E×m×n, the ``experts``
layout) and keeps one basis per slice (E×m×r, E×n×r), or one basis shared by the stack (m×r,
n×r: a seeded random projection), every operation batched over E.

A projector holds one basis per projected side, orthonormal unless it says otherwise
(:attr:`Projector.orthonormal`):

* ``Side.LEFT``  — ``L`` (m×r): ``R = Lᵀ G`` (r×n), lifted back as ``L R``;
* ``Side.RIGHT`` — ``Q`` (n×r): ``R = G Q`` (m×r), lifted back as ``R Qᵀ``;
* ``Side.BOTH``  — both: ``R = Lᵀ G Q`` (r×r), lifted back as ``L R Qᵀ``.

The side is chosen once, at the first refresh, from the gradient's shape and the ``side``
policy, and is stored in the state — it is never re-derived from a tensor's shape.

The rank r′ ≤ ``rank`` may differ from one refresh to the next (an adaptive-rank projector): the
optimizer then restarts that weight's moments in the new shape from the inner optimizer's fresh
state (the step count goes on), whatever ``on_refresh`` says, warning once per weight unless
``on_refresh`` is ``reset`` (``LowRankOptimizer._after_refresh`` in lit_lowrank/optim/lowrank.py).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from lit_lowrank.projectors.storage import BasisStorage, Stored
from lit_lowrank.quantizers.base import Quantizer

SIDE_POLICIES = ("std", "reverse_std", "left", "right", "full")


class Side(enum.IntEnum):
    LEFT = 0
    RIGHT = 1
    BOTH = 2


def choose_side(policy: str, shape: torch.Size | tuple[int, ...]) -> Side:
    """GaLore's side policies for an m×n gradient (or a stack of them: the last two dimensions).
    ``std`` projects the smaller dimension, so the low-rank tensor has ``r·max(m, n)`` entries;
    ``reverse_std`` the larger one."""
    m, n = shape[-2:]
    if policy == "std":
        return Side.RIGHT if m >= n else Side.LEFT
    if policy == "reverse_std":
        return Side.LEFT if m >= n else Side.RIGHT
    if policy == "left":
        return Side.LEFT
    if policy == "right":
        return Side.RIGHT
    if policy == "full":
        return Side.BOTH
    raise ValueError(f"unknown side policy {policy!r}; expected one of {SIDE_POLICIES}")


def basis_bytes(bases: tuple[Tensor | None, Tensor | None] | None) -> int:
    """Bytes of a dense ``(L, Q)`` pair (0 for None, e.g. nothing cached)."""
    return sum(t.numel() * t.element_size() for t in bases or () if t is not None)


class Projector(ABC):
    """Projects one weight's gradient onto a rank-``rank`` subspace.

    Args:
        rank: subspace dimension r (already clamped to ``min(m, n)`` by the optimizer).
        side: one of :data:`SIDE_POLICIES`.
        seed: a per-parameter integer; random projectors derive their generator from it.

    Subclasses implement :meth:`_refresh` (recompute the basis from a gradient) and
    :meth:`bases` (the dense bases in the gradient's dtype), and extend
    :meth:`state_dict`/:meth:`load_state_dict` with their own tensors.

    Built by the optimizer once per weight, offered ``rank``, ``side``, ``seed`` and ``ledger``
    (the optimizer's dict of ranks granted by seed, for projectors that share a rank budget),
    each only if ``__init__`` accepts it; the user's ``projector_args`` come on top, with a
    ``quantizer`` name resolved to its class.
    """

    batched: bool = False
    """Whether the projector takes a stack of gradients (E×m×n, one basis per slice: the
    ``experts`` layout) besides single m×n gradients; the optimizer refuses stacked experts
    for a projector that does not."""
    projects_tensors: bool = False
    """Whether the projector projects a convolution kernel as a tensor (Tucker: one basis per
    mode); otherwise the optimizer hands it the kernel's out × (in·k…) matricization."""
    needs_gradient: bool = True
    """Whether :meth:`refresh` reads the gradient's values. A projector that draws its basis from
    a seed and the gradient's shape alone (``random``) sets False and implements :meth:`preview`,
    so the basis of a coming step is known before its gradient exists (CompAct's compressed
    activations are projected with it in the forward pass)."""
    orthonormal: bool = True
    """Whether the bases have orthonormal columns (``LᵀL = I``), so ``project_back ∘ project``
    is an orthogonal projection; a plain Gaussian sketch (``random``) has not."""

    def __init__(self, rank: int, *, side: str = "std", seed: int = 0) -> None:
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        choose_side(side, (1, 1))  # validates the policy name early
        self.rank = rank
        self.side_policy = side
        self.seed = seed
        self.side: Side | None = None
        self.refreshes = 0

    def refresh(self, grad: Tensor) -> None:
        """Recompute the subspace from ``grad`` (m×n, or E×m×n for a ``batched`` projector)."""
        if grad.ndim != 2 and not (self.batched and grad.ndim == 3):
            kind = "2-D or 3-D (E×m×n)" if self.batched else "2-D"
            raise ValueError(f"{type(self).__name__} takes {kind} gradients, got shape {tuple(grad.shape)}")
        if self.side is None:
            self.side = choose_side(self.side_policy, grad.shape)
        self._refresh(grad)
        self.refreshes += 1

    @abstractmethod
    def _refresh(self, grad: Tensor) -> None:
        """Recompute the basis for ``self.side`` from ``grad`` (m×n)."""

    @abstractmethod
    def bases(self) -> tuple[Tensor | None, Tensor | None]:
        """``(L, Q)``: left basis m×r (or None) and right basis n×r (or None)."""

    def preview(self, like: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """The ``(L, Q)`` that :meth:`refresh` on a gradient shaped like ``like`` would give,
        without refreshing; only projectors with ``needs_gradient = False`` can tell."""
        raise NotImplementedError(f"{type(self).__name__} fits its basis to the gradient's values, so the basis "
                                  "of a coming refresh is unknown before the gradient exists")

    def project(self, grad: Tensor) -> Tensor:
        """``G`` (m×n) → ``R``: r×n (left), m×r (right) or r×r (both)."""
        left, right = self.bases()
        low = grad if left is None else left.mT @ grad
        return low if right is None else low @ right

    def project_back(self, low: Tensor) -> Tensor:
        """``R`` → the m×n lift ``L R``, ``R Qᵀ`` or ``L R Qᵀ`` (unscaled)."""
        left, right = self.bases()
        full = low if left is None else left @ low
        return full if right is None else full @ right.mT

    def add_back_(self, target: Tensor, low: Tensor, alpha: float) -> Tensor:
        """``target += alpha · project_back(low)`` in one fused ``addmm_`` (``baddbmm_`` for a
        stack; no m×n temporary beyond ``target`` for one-sided projections)."""
        left, right = self.bases()
        if target.ndim == 3:  # a stack; a basis shared by the stack (2-D) is broadcast
            left, right = (None if b is None else b.expand(target.shape[0], *b.shape[-2:]) for b in (left, right))
            if left is None:
                return target.baddbmm_(low, right.mT, alpha=alpha)
            if right is None:
                return target.baddbmm_(left, low, alpha=alpha)
            return target.baddbmm_(left @ low, right.mT, alpha=alpha)
        if left is None:
            return target.addmm_(low, right.T, alpha=alpha)
        if right is None:
            return target.addmm_(left, low, alpha=alpha)
        return target.addmm_(left @ low, right.T, alpha=alpha)

    def resident_bytes(self) -> int:
        """Bytes this projector keeps alive between steps: its non-scalar state tensors, plus
        whatever a subclass caches beside them (a regenerated basis)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values() if t.ndim > 0)

    def state_dict(self) -> dict[str, Tensor]:
        side = -1 if self.side is None else int(self.side)
        return {"side": torch.tensor(side), "refreshes": torch.tensor(self.refreshes)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        side = int(state["side"])
        self.side = None if side < 0 else Side(side)
        self.refreshes = int(state["refreshes"])


class DenseBasisProjector(Projector):
    """A projector that stores its bases as dense matrices (SVD-like projectors).

    Subclasses implement :meth:`fit`, returning new bases from a float32 gradient. Bases are
    stored in the gradient's dtype; half-precision gradients are fitted in float32 (as in GaLore).
    With ``quantizer`` (a :class:`~lit_lowrank.Quantizer` class; the optimizer resolves the
    registered name in ``projector_args``) and ``quantizer_args`` they are stored packed and
    dequantized on use — Q-GaLore's INT4 basis is ``projector_args: {quantizer: int,
    quantizer_args: {bits: 4, group_size: 256}}``.
    """

    def __init__(
        self, rank: int, *, side: str = "std", seed: int = 0, quantizer: type[Quantizer] | None = None,
        quantizer_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(rank, side=side, seed=seed)
        self._storage = BasisStorage(quantizer, quantizer_args)  # plain, or e.g. INT4 (Q-GaLore)
        self._left: Stored | None = None
        self._right: Stored | None = None

    @abstractmethod
    def fit(self, grad: Tensor, side: Side) -> tuple[Tensor | None, Tensor | None]:
        """New ``(L, Q)`` for ``side`` from ``grad`` (m×n, float32 or float64); L m×r, Q n×r."""

    def _refresh(self, grad: Tensor) -> None:
        precise = grad if grad.dtype in (torch.float32, torch.float64) else grad.float()
        left, right = self.fit(precise, self.side)
        self._left = self._storage.pack(left, grad.dtype)
        self._right = self._storage.pack(right, grad.dtype)

    def bases(self) -> tuple[Tensor | None, Tensor | None]:
        if self._left is None and self._right is None:
            raise RuntimeError("projector used before its first refresh()")
        return self._storage.unpack(self._left), self._storage.unpack(self._right)

    def state_dict(self) -> dict[str, Tensor]:
        state = super().state_dict()
        for key, basis in (("left", self._left), ("right", self._right)):
            state.update(self._storage.state(key, basis))
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        self._left = self._storage.load("left", state)
        self._right = self._storage.load("right", state)
