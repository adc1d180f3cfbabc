"""Seeded random Gaussian projection (APOLLO, Zhu et al. 2024): no SVD, and only the seed
and a refresh counter are checkpointed — the matrix is regenerated from them."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.projectors.base import Projector, Side, basis_bytes, choose_side
from lit_lowrank.projectors.sketch import gaussian, orthonormalize, seeded_generator


class RandomProjector(Projector):
    """Bases with i.i.d. ``N(0, 1/r)`` entries: ``L`` (m×r) and/or ``Q`` (n×r).

    With variance 1/r, ``E[Q Qᵀ] = I`` and ``‖G Q‖`` estimates ``‖G‖`` (Johnson–Lindenstrauss),
    which is all APOLLO needs from ``R``. The k-th matrix (k = 0, 1, ... counts refreshes) is
    drawn on the CPU from a generator seeded with ``(seed, k)``; for ``side: full`` L is drawn
    before Q from the same generator.

    Args:
        rank, side, seed: as :class:`Projector` (the optimizer passes the parameter index as seed).
        orthonormal: orthonormalize the Gaussian (QR) — a uniformly random subspace, which makes
            ``lift(project(G))`` an orthogonal projection (useful with the galore/fira rules).
        cache_basis: keep the dense matrix between steps (True: ``r·d`` elements in the
            gradient's dtype, counted by :meth:`resident_bytes`) or redraw it from ``(seed, k)``
            at every use (False: bitwise the same steps, no resident matrix, a CPU draw — and a
            QR if ``orthonormal`` — two or three times per step).

    State: ``side``, ``refreshes``, ``seed``, ``shape`` (m, n) and ``like`` (an empty tensor
    with the gradient's dtype and device). The dense matrix is a runtime cache, not state.

    Batched: a stack of experts (E×m×n) shares one draw, m×r / n×r (each expert's ``R`` is its
    own sketch ``G_e Q``; the cached basis is ``r·d`` once, not E times).
    """

    batched = True
    needs_gradient = False

    def __init__(self, rank: int, *, side: str = "std", seed: int = 0, orthonormal: bool = False,
                 cache_basis: bool = True) -> None:
        super().__init__(rank, side=side, seed=seed)
        self.orthonormal = orthonormal
        self.cache_basis = cache_basis
        self._shape: tuple[int, int] | None = None
        self._like: Tensor | None = None
        self._cache: tuple[Tensor | None, Tensor | None] | None = None

    def _refresh(self, grad: Tensor) -> None:
        self._shape = (grad.shape[-2], grad.shape[-1])
        self._like = grad.new_empty(0)
        self._cache = self._generate(self.refreshes) if self.cache_basis else None

    def preview(self, like: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """The draw ``(seed, refreshes)`` that the next refresh makes: it depends on ``like``'s
        shape, dtype and device only."""
        if self.side is None:
            self.side = choose_side(self.side_policy, like.shape)
        self._shape, self._like = (like.shape[-2], like.shape[-1]), like.new_empty(0)
        return self._generate(self.refreshes)

    def _generate(self, counter: int) -> tuple[Tensor | None, Tensor | None]:
        m, n = self._shape
        generator = seeded_generator(self.seed, counter)
        left = right = None
        if self.side in (Side.LEFT, Side.BOTH):
            left = self._basis(gaussian(self.rank, m, generator, self._like))
        if self.side in (Side.RIGHT, Side.BOTH):
            right = self._basis(gaussian(self.rank, n, generator, self._like))
        return left, right

    def _basis(self, draw: Tensor) -> Tensor:
        """r×d draw → d×r basis."""
        if self.orthonormal:  # QR in float32 at least (half-precision QR is unsupported or poor)
            return orthonormalize(draw.T.to(torch.promote_types(draw.dtype, torch.float32))).to(draw.dtype)
        return draw.T / math.sqrt(self.rank)

    def bases(self) -> tuple[Tensor | None, Tensor | None]:
        if self._cache is not None:
            return self._cache
        if self._shape is None or not self.refreshes:
            raise RuntimeError("projector used before its first refresh()")
        bases = self._generate(self.refreshes - 1)
        if self.cache_basis:
            self._cache = bases
        return bases

    def resident_bytes(self) -> int:
        return super().resident_bytes() + basis_bytes(self._cache)

    def state_dict(self) -> dict[str, Tensor]:
        state = super().state_dict()
        if self._shape is not None:
            state.update(seed=torch.tensor(self.seed), shape=torch.tensor(self._shape), like=self._like)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        self._cache = None
        if "shape" in state:
            self.seed = int(state["seed"])
            self._shape = tuple(int(d) for d in state["shape"])
            self._like = state["like"]


@hookimpl
def register_projectors(register) -> None:
    register("random", RandomProjector)
