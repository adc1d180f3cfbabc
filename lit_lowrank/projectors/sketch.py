"""Seeded Gaussian sketches and the randomized range finder, shared by the ``random``,
``rsvd`` and ``online-pca`` projectors.

The k-th random matrix of a parameter is drawn on the CPU from a generator seeded with the
pair ``(seed, k)``, so it is the same on every device, on every DDP rank and after a resume.
NumPy's ``SeedSequence`` hashes the pair into the generator's full 128-bit state: distinct pairs
give independent streams (torch's CPU generator keeps only 32 bits of a seed, so packing the
pair into one torch seed would make matrices collide).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def seeded_generator(seed: int, counter: int) -> np.random.Generator:
    """The generator of the ``counter``-th draw of parameter ``seed`` (both ≥ 0): PCG64 seeded
    by ``SeedSequence([seed, counter])``."""
    if seed < 0 or counter < 0:
        raise ValueError(f"seed and counter must be >= 0, got {seed}, {counter}")
    return np.random.default_rng([seed, counter])


def gaussian(rows: int, cols: int, generator: np.random.Generator, like: Tensor) -> Tensor:
    """A rows×cols standard normal matrix drawn in float32 on the CPU, then moved to ``like``'s
    device and dtype (drawing on the CPU keeps it device-independent)."""
    draw = generator.standard_normal((rows, cols), dtype=np.float32)
    return torch.from_numpy(draw).to(device=like.device, dtype=like.dtype)


def orthonormalize(matrix: Tensor) -> Tensor:
    """Q of the thin QR of ``matrix`` (d×k, or a stack of them), signs fixed so that
    ``diag(R) ≥ 0``: a matrix whose columns are already orthonormal is returned unchanged, so
    small updates stay small."""
    q, r = torch.linalg.qr(matrix)
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    return q * torch.where(signs == 0, torch.ones_like(signs), signs)


def range_finder(matrix: Tensor, sketch: Tensor, power_iters: int) -> Tensor:
    """Orthonormal basis (m×k) of the dominant column space of ``matrix`` (m×n; batched over
    leading dimensions).

    Halko, Martinsson & Tropp 2011, Alg. 4.4 (randomized subspace iteration): ``Y = A Ω``
    with the n×k Gaussian ``Ω``, then ``q`` rounds of ``Y ← A (Aᵀ Y)``, re-orthonormalizing
    after every product so that small singular directions are not lost to round-off.
    """
    basis = orthonormalize(matrix @ sketch)
    for _ in range(power_iters):
        basis = orthonormalize(matrix.mT @ basis)
        basis = orthonormalize(matrix @ basis)
    return basis
