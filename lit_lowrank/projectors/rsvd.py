"""Randomized SVD projector (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1): a fast drop-in
for GaLore's exact SVD."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.projectors.base import DenseBasisProjector, Side
from lit_lowrank.projectors.sketch import gaussian, range_finder, seeded_generator
from lit_lowrank.quantizers.base import Quantizer
from lit_lowrank.projectors.svd import top_singular_bases


class RandomizedSVDProjector(DenseBasisProjector):
    """Top-r singular vectors of G (m×n) from a sketch of k = r + p columns.

    ``Q = range_finder(G, Ω, q)`` (m×k, Ω n×k Gaussian), ``B = Qᵀ G`` (k×n), exact SVD of the
    small ``B = Ũ S Vᵀ``; then ``L = Q Ũ[:, :r]`` (m×r) and ``Q_right = V[:, :r]`` (n×r).
    Cost O(mnk(2q + 2)) instead of the full SVD's O(mn·min(m, n)).

    Args:
        rank, side, seed, quantizer, quantizer_args: as :class:`DenseBasisProjector`.
        oversample: p, extra sketch columns (Halko et al. recommend 5–10).
        power_iters: q, subspace iterations; each sharpens the spectrum's decay σᵢ → σᵢ^(2q+1).

    Ω of the k-th refresh is seeded from ``(seed, k)`` on the CPU, so DDP ranks (same
    all-reduced gradient, same seed) find identical bases.
    """

    batched = True
    """A stack E×m×n is sketched with one Ω (n×k) shared by the slices, each slice keeping its own range."""

    def __init__(
        self, rank: int, *, side: str = "std", seed: int = 0, oversample: int = 10, power_iters: int = 2,
        quantizer: type[Quantizer] | None = None, quantizer_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(rank, side=side, seed=seed, quantizer=quantizer, quantizer_args=quantizer_args)
        if oversample < 0 or power_iters < 0:
            raise ValueError(f"oversample and power_iters must be >= 0, got {oversample}, {power_iters}")
        self.oversample = oversample
        self.power_iters = power_iters

    def fit(self, grad: Tensor, side: Side) -> tuple[Tensor | None, Tensor | None]:
        m, n = grad.shape[-2:]
        size = min(self.rank + self.oversample, m, n)
        sketch = gaussian(n, size, seeded_generator(self.seed, self.refreshes), grad)
        basis = range_finder(grad, sketch, self.power_iters)  # m×k
        small_u, _, small_vh = torch.linalg.svd(basis.mT @ grad, full_matrices=False)
        return top_singular_bases(basis @ small_u, small_vh, self.rank, side)


@hookimpl
def register_projectors(register) -> None:
    register("rsvd", RandomizedSVDProjector)
