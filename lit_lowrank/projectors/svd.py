"""GaLore's exact-SVD projector (Zhao et al. 2024, Alg. 2): the top-r singular vectors of G."""

from __future__ import annotations

import torch
from torch import Tensor

from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.projectors.base import DenseBasisProjector, Side


class SVDProjector(DenseBasisProjector):
    """Thin SVD ``G = U S Vᵀ`` in float32; ``L = U[:, :r]`` (m×r), ``Q = V[:, :r]`` (n×r).
    Batched: a stack E×m×n gets one batched SVD and bases E×m×r / E×n×r.

    Both sides come from one SVD of G itself (not of Gᵀ), so singular-vector signs match
    galore-torch's and moment trajectories can be compared with it.
    """

    batched = True

    def fit(self, grad: Tensor, side: Side) -> tuple[Tensor | None, Tensor | None]:
        u, _, vh = torch.linalg.svd(grad, full_matrices=False)
        return top_singular_bases(u, vh, self.rank, side)


def top_singular_bases(u: Tensor, vh: Tensor, rank: int, side: Side) -> tuple[Tensor | None, Tensor | None]:
    """From a thin SVD ``U S Vᵀ`` (``u`` m×k, ``vh`` k×n, or stacks of them): ``L = U[:, :r]``
    (m×r) and/or ``Q = V[:, :r]`` (n×r), as ``side`` asks — the Eckart–Young optimal rank-r subspaces."""
    left = u[..., :rank].clone() if side in (Side.LEFT, Side.BOTH) else None
    right = vh[..., :rank, :].mT.contiguous() if side in (Side.RIGHT, Side.BOTH) else None
    return left, right


@hookimpl
def register_projectors(register) -> None:
    register("svd", SVDProjector)
