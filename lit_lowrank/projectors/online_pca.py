"""Online Subspace Descent (Liang et al. 2024, "Memory-Efficient LLM Training with Online
Subspace Descent", Alg. 1): the basis follows the gradients by online PCA — one gradient step
on the reconstruction error per refresh, re-orthonormalized — instead of a periodic SVD."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.projectors.base import DenseBasisProjector, Side
from lit_lowrank.projectors.sketch import gaussian, orthonormalize, range_finder, seeded_generator
from lit_lowrank.quantizers.base import Quantizer
from lit_lowrank.projectors.svd import top_singular_bases

INITS = ("range", "svd")


def online_pca_step(basis: Tensor, grad: Tensor, lr: float) -> Tensor:
    """One step of ``P ← orth(P − η ∇_P ‖Ĝ − P Pᵀ Ĝ‖²_F)`` with ``Ĝ = G / ‖G‖_F``.

    ``basis`` P is d×r (orthonormal), ``grad`` G is d×c. For orthonormal P the gradient is
    ``−2 (I − P Pᵀ) Ĝ Ĝᵀ P`` (Oja's subspace rule), computed with two d×c×r products and no
    d×d matrix. Normalizing G makes η independent of the gradient's scale (as in OSD's code).
    """
    norm = torch.linalg.vector_norm(grad)
    if norm == 0:
        return basis.clone()
    scaled = grad / norm
    pulled = scaled @ (scaled.T @ basis)  # Ĝ Ĝᵀ P, d×r
    tangent = pulled - basis @ (basis.T @ pulled)  # (I − P Pᵀ) Ĝ Ĝᵀ P
    return orthonormalize(basis + 2 * lr * tangent)


class OnlinePCAProjector(DenseBasisProjector):
    """A basis updated by :func:`online_pca_step` at every refresh after the first; use it with
    ``schedule: every-step`` (OSD updates P every step). Left side: P = L tracks G's column
    space; right side: P = Q tracks Gᵀ's.

    Args:
        rank, side, seed, quantizer, quantizer_args: as :class:`DenseBasisProjector`.
        lr: η, the online-PCA step size on the normalized gradient. The subspace angle to a
            direction with eigenvalue gap δ of ĜĜᵀ shrinks by about ``1 − 2ηδ`` per step.
        init: first basis — ``range``: randomized range finder with ``power_iters`` rounds
            (QR only, no SVD anywhere); ``svd``: GaLore's exact SVD (what OSD's code does).
        power_iters: subspace iterations of the ``range`` initialisation.

    Differences from OSD's code: P is updated by plain gradient descent with a QR retraction
    (OSD runs AdamW on P and lets it drift from orthonormal), and the update uses the current
    gradient before projecting it (OSD steps P after forming the update with the old P).
    """

    def __init__(
        self, rank: int, *, side: str = "std", seed: int = 0, lr: float = 0.5, init: str = "range",
        power_iters: int = 1, quantizer: type[Quantizer] | None = None, quantizer_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(rank, side=side, seed=seed, quantizer=quantizer, quantizer_args=quantizer_args)
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; expected one of {INITS}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.lr = lr
        self.init = init
        self.power_iters = power_iters

    def fit(self, grad: Tensor, side: Side) -> tuple[Tensor | None, Tensor | None]:
        if self.refreshes == 0:
            return self._initial(grad, side)
        left, right = (None if b is None else b.to(grad.dtype) for b in self.bases())
        return (None if left is None else online_pca_step(left, grad, self.lr),
                None if right is None else online_pca_step(right, grad.T, self.lr))

    def _initial(self, grad: Tensor, side: Side) -> tuple[Tensor | None, Tensor | None]:
        if self.init == "svd":
            u, _, vh = torch.linalg.svd(grad, full_matrices=False)
            return top_singular_bases(u, vh, self.rank, side)
        generator = seeded_generator(self.seed, 0)
        left = right = None
        if side in (Side.LEFT, Side.BOTH):
            left = range_finder(grad, gaussian(grad.shape[1], self.rank, generator, grad), self.power_iters)
        if side in (Side.RIGHT, Side.BOTH):
            right = range_finder(grad.T, gaussian(grad.shape[0], self.rank, generator, grad), self.power_iters)
        return left, right


@hookimpl
def register_projectors(register) -> None:
    register("online-pca", OnlinePCAProjector)
