"""SVD-free DCT projection (Modoranu et al. 2025, "SVD-Free Low-Rank Adaptive Gradient
Optimization for Large Language Models"): a fixed orthonormal DCT-II basis, of which each
refresh keeps the r vectors most aligned with the gradient. Only their indices are stored."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.projectors.base import Projector, Side, basis_bytes


def dct_ii(x: Tensor) -> Tensor:
    """Orthonormal DCT-II along the last axis, ``y_k = Σᵢ D[i, k] x_i`` with
    ``D[i, k] = c_k cos(π (2i + 1) k / 2d)``, ``c_0 = √(1/d)``, ``c_k = √(2/d)``.

    Makhoul's FFT algorithm (1980): O(d log d) per row, without forming the d×d matrix.
    """
    d = x.shape[-1]
    reordered = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1)
    spectrum = torch.fft.fft(reordered, dim=-1)
    k = torch.arange(d, device=x.device, dtype=torch.float64)
    twiddle = torch.polar(torch.ones_like(k), -math.pi * k / (2 * d)).to(spectrum.dtype)
    out = (spectrum * twiddle).real
    out[..., 0] *= math.sqrt(1 / d)
    out[..., 1:] *= math.sqrt(2 / d)
    return out


def dct_columns(dim: int, indices: Tensor) -> Tensor:
    """``D[:, indices]`` (dim×r), evaluated from the closed form in float64."""
    i = torch.arange(dim, dtype=torch.float64, device=indices.device)[:, None]
    k = indices.to(torch.float64)[None, :]
    columns = math.sqrt(2 / dim) * torch.cos(math.pi * (2 * i + 1) * k / (2 * dim))
    return torch.where(k == 0, math.sqrt(1 / dim), columns)


class DCTProjector(Projector):
    """Right side: scores ``s_k = ‖G d_k‖`` (column norms of ``G D_n``), ``Q = D_n[:, top-r]``;
    left side: ``s_k = ‖d_kᵀ G‖``, ``L = D_m[:, top-r]``. Indices are kept in descending score
    order, so the first basis vector is the most aligned one (what lazy schedules compare).

    Scoring costs O(mn log n) (FFT); no SVD and no float32 copy of a basis is kept: the state
    is r integers per projected side plus the scalar shape. The dense columns (``r·d``
    elements in the gradient's dtype) are a runtime cache rebuilt from the indices, counted by
    :meth:`resident_bytes`; ``cache_basis=False`` rebuilds them at every use instead (bitwise
    the same steps, a cosine table of d×r evaluated two or three times per step).
    """

    def __init__(self, rank: int, *, side: str = "std", seed: int = 0, cache_basis: bool = True) -> None:
        super().__init__(rank, side=side, seed=seed)
        self.cache_basis = cache_basis
        self._indices: dict[str, Tensor] = {}
        self._dims: tuple[int, int] | None = None
        self._like: Tensor | None = None
        self._cache: tuple[Tensor | None, Tensor | None] | None = None

    def _refresh(self, grad: Tensor) -> None:
        precise = grad if grad.dtype in (torch.float32, torch.float64) else grad.float()
        self._dims = (grad.shape[0], grad.shape[1])
        self._like = grad.new_empty(0)
        self._indices = {}
        if self.side in (Side.LEFT, Side.BOTH):
            self._indices["left_indices"] = self._top(precise.T)
        if self.side in (Side.RIGHT, Side.BOTH):
            self._indices["right_indices"] = self._top(precise)
        self._cache = None

    def _top(self, rows: Tensor) -> Tensor:
        """Indices of the r DCT vectors with the largest ``‖rows · d_k‖`` (descending)."""
        scores = torch.linalg.vector_norm(dct_ii(rows), dim=0)
        return torch.topk(scores, self.rank).indices

    def bases(self) -> tuple[Tensor | None, Tensor | None]:
        if self._dims is None:
            raise RuntimeError("projector used before its first refresh()")
        if self._cache is not None:
            return self._cache
        m, n = self._dims
        bases = (self._columns(m, "left_indices"), self._columns(n, "right_indices"))
        if self.cache_basis:
            self._cache = bases
        return bases

    def resident_bytes(self) -> int:
        return super().resident_bytes() + basis_bytes(self._cache)

    def _columns(self, dim: int, key: str) -> Tensor | None:
        if key not in self._indices:
            return None
        return dct_columns(dim, self._indices[key]).to(self._like)

    def state_dict(self) -> dict[str, Tensor]:
        state = super().state_dict()
        if self._dims is not None:
            m, n = self._dims
            state.update(self._indices, rows=torch.tensor(m), cols=torch.tensor(n), like=self._like)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        self._cache = None
        if "rows" in state:
            self._dims = (int(state["rows"]), int(state["cols"]))
            self._like = state["like"]
            self._indices = {k: state[k] for k in ("left_indices", "right_indices") if k in state}


@hookimpl
def register_projectors(register) -> None:
    register("dct", DCTProjector)
