"""``srht``: a randomized-SVD projector with a subsampled randomized Hadamard sketch.

For a gradient ``G`` (m×n) and the left basis (the right one is the same on ``Gᵀ``):

1. sketch ``Y = G Ω`` with ``Ω = D H S`` (n×k, k = r + oversample): ``D`` random ±1 signs,
   ``H`` the orthonormal Walsh–Hadamard matrix of size 2^⌈log₂ n⌉ (G zero-padded), applied by a
   fast transform in O(m n log n), and ``S`` k random columns (Halko et al. 2011, §4.6);
2. ``q`` power iterations ``Y ← G (Gᵀ Y)`` with re-orthonormalization sharpen a slowly
   decaying spectrum (Alg. 4.4);
3. ``Q = qr(Y)``, ``B = Qᵀ G`` (k×n), ``B = Ũ Σ Vᵀ`` (small SVD), ``L = Q Ũ[:, :r]``.

Exact when ``rank(G) ≤ k``; otherwise close to the optimal subspace at a fraction of the cost of
a full SVD for large n. The randomness of each refresh comes from a CPU generator seeded with
(parameter seed, refresh count), so every device and every resume draws the same sketch.

``freeze-bias``: a model transform (:class:`FreezeBias`) that keeps the biases of the low-rank
target layers at their initial values, so those layers train only their projected weights.
"""

from __future__ import annotations

import math

from typing import Sequence

import torch
from torch import Tensor, nn

from lit_lowrank import DenseBasisProjector, Side, Transform, hookimpl, select_targets


def fwht(x: Tensor) -> Tensor:
    """Orthonormal fast Walsh–Hadamard transform along the last dimension (a power of 2):
    ``x ↦ x Hᵀ = x H`` with ``H`` Sylvester-ordered and scaled by ``1/√n`` (so ``H H = I``)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    lead, h, y = x.shape[:-1], 1, x
    while h < n:
        pairs = y.reshape(*lead, n // (2 * h), 2, h)
        y = torch.stack((pairs[..., 0, :] + pairs[..., 1, :], pairs[..., 0, :] - pairs[..., 1, :]), dim=-2)
        h *= 2
    return y.reshape(x.shape) / math.sqrt(n)


def srht_sketch(grad: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """``Y = G D H S`` (m×k) for ``G`` (m×n): signs ``D`` and the ``k`` columns ``S`` are drawn
    from ``generator`` (CPU) and moved to ``grad``'s device."""
    m, n = grad.shape
    size = 1 << max(0, (n - 1).bit_length())
    signs = torch.randint(0, 2, (n,), generator=generator).mul_(2).sub_(1).to(grad)
    columns = torch.randperm(size, generator=generator)[:k].to(grad.device)
    padded = torch.nn.functional.pad(grad * signs, (0, size - n))
    return fwht(padded).index_select(1, columns) * math.sqrt(size / k)


class SRHTProjector(DenseBasisProjector):
    """Randomized SVD with an SRHT sketch.

    Args:
        rank: r.
        oversample: extra sketch columns p (k = r + p, capped by the matrix size).
        power_iters: power iterations q (0 = plain sketch; 1-2 for flat spectra).
        side, seed, quantizer, quantizer_args: as :class:`lit_lowrank.DenseBasisProjector`.
    """

    def __init__(self, rank: int, *, oversample: int = 8, power_iters: int = 1, **kwargs) -> None:
        super().__init__(rank, **kwargs)
        if oversample < 0 or power_iters < 0:
            raise ValueError(f"oversample and power_iters must be >= 0, got {oversample}, {power_iters}")
        self.oversample = oversample
        self.power_iters = power_iters

    def fit(self, grad: Tensor, side: Side) -> tuple[Tensor | None, Tensor | None]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.refreshes)
        sketch_of = grad if side in (Side.LEFT, Side.BOTH) else grad.T
        u, _, vh = self._range_svd(sketch_of, generator)
        if side is Side.RIGHT:  # we decomposed Gᵀ = U S Vᵀ, so G's right vectors are U
            return None, u[:, : self.rank]
        left = u[:, : self.rank]
        return left, (vh[: self.rank].T if side is Side.BOTH else None)

    def _range_svd(self, a: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Approximate thin SVD of ``a`` (m×n) restricted to a sketched k-dim range."""
        k = min(self.rank + self.oversample, *a.shape)
        basis, _ = torch.linalg.qr(srht_sketch(a, k, generator))
        for _ in range(self.power_iters):
            basis, _ = torch.linalg.qr(a.T @ basis)
            basis, _ = torch.linalg.qr(a @ basis)
        small_u, s, vh = torch.linalg.svd(basis.T @ a, full_matrices=False)
        return basis @ small_u, s, vh


@hookimpl
def register_projectors(register) -> None:
    register("srht", SRHTProjector)


FROZEN_BY = "frozen_by"
"""The attribute marking a bias frozen by :class:`FreezeBias` (so undo unfreezes only those)."""


class FreezeBias(Transform):
    """``freeze-bias``: the biases of the low-rank target layers keep their initial values
    (``requires_grad=False``): the optimizer then has no dense state for them and those layers
    train only their projected weights. A bias tied to another module stays tied (it is frozen for
    every use). :meth:`undo` makes them trainable again. No options."""

    name = "freeze-bias"
    estimated_applied = True  # the frozen biases get no gradient nor state: estimate a model holding it

    def apply(self, model: nn.Module, targets: Sequence[str] | None, exclude: Sequence[str]) -> list[str]:
        low_rank, _ = select_targets(model, targets, exclude)
        frozen = []
        for weight_name in low_rank:
            module_name = weight_name.rpartition(".")[0]
            bias = getattr(model.get_submodule(module_name), "bias", None)
            if isinstance(bias, nn.Parameter) and bias.requires_grad:
                bias.requires_grad_(False)
                setattr(bias, FROZEN_BY, self.name)
                frozen.append(f"{module_name}.bias".lstrip("."))
        if not frozen and not self.applied(model):
            raise ValueError("freeze-bias: no low-rank target layer has a trainable bias; drop freeze-bias from "
                             "lowrank.transforms or change `targets`")
        return frozen

    def applied(self, model: nn.Module) -> bool:
        return any(getattr(p, FROZEN_BY, None) == self.name for p in model.parameters())

    def undo(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            if getattr(p, FROZEN_BY, None) == self.name:
                p.requires_grad_(True)
                delattr(p, FROZEN_BY)
        return model


@hookimpl
def register_transforms(register) -> None:
    register(FreezeBias.name, FreezeBias)
