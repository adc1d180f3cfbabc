"""Tucker projection of a convolution kernel's gradient (Tensor-GaLore, George et al. 2024;
FLoRA, Si et al. 2024): one orthonormal basis per mode instead of a matricization.

For a gradient ``G`` of shape d₁×d₂×…×d_N (a conv kernel: out×in×k₁×…), the truncated HOSVD
(De Lathauwer et al. 2000) gives per-mode bases ``U_k`` (d_k×r_k, the top-r_k left singular
vectors of the mode-k unfolding ``G_(k)``, r_k = min(r, d_k)). The projection is the core

    C = G ×₁ U₁ᵀ ×₂ U₂ᵀ … ×_N U_Nᵀ          (r₁×…×r_N)

and the lift ``C ×₁ U₁ ×₂ U₂ … ×_N U_N``. Moments live in the core's shape, so the state is
``2·∏ r_k`` moments plus ``Σ d_k·r_k`` basis entries instead of AdamW's ``2·∏ d_k``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.projectors.base import Projector, Side


def multiply_modes(tensor: Tensor, matrices: tuple[Tensor, ...]) -> Tensor:
    """``tensor ×₁ M₁ ×₂ M₂ … ×_N M_N`` (``M_k``: e_k×d_k) by mode cycling: multiply the leading
    axis as a matrix (one matmul on a free reshape), then move it to the end, so after N modes the
    axes are back in order — one contiguous copy per mode."""
    for matrix in matrices:
        product = matrix @ tensor.reshape(tensor.shape[0], -1)
        tensor = product.reshape(matrix.shape[0], *tensor.shape[1:]).movedim(0, -1).contiguous()
    return tensor


class TuckerProjector(Projector):
    """Per-mode HOSVD bases of an N-D gradient (every mode projected; a 2-D gradient gets the
    two-sided ``Lᵀ G Q`` of its top singular vectors). The projection is always on every mode
    (``Side.BOTH``): ``side`` may be left at ``std`` or set to ``full``, and another side is refused. The bases are fitted in float32 and kept in the
    gradient's dtype; each mode's rank is ``min(rank, d_k)``.

    ``bases()`` returns the N factors ``(U₁, …, U_N)``, one per mode.
    """

    projects_tensors = True

    def __init__(self, rank: int, *, side: str = "std", seed: int = 0) -> None:
        if side not in ("std", "full"):
            raise ValueError(f"the Tucker projector projects every mode, so side {side!r} cannot be honoured; "
                             "leave side at std (or full)")
        super().__init__(rank, side="full", seed=seed)
        self._factors: tuple[Tensor, ...] = ()

    def refresh(self, grad: Tensor) -> None:
        if grad.ndim < 2:
            raise ValueError(f"TuckerProjector takes gradients of 2 or more dimensions, got shape {tuple(grad.shape)}")
        self.side = Side.BOTH
        self._refresh(grad)
        self.refreshes += 1

    def _refresh(self, grad: Tensor) -> None:
        precise = grad if grad.dtype in (torch.float32, torch.float64) else grad.float()
        factors = []
        for mode, size in enumerate(grad.shape):
            unfolding = torch.movedim(precise, mode, 0).reshape(size, -1)  # G_(k), d_k × ∏_{j≠k} d_j
            u, _, _ = torch.linalg.svd(unfolding, full_matrices=False)
            factors.append(u[:, :min(self.rank, size)].to(grad.dtype).contiguous())
        self._factors = tuple(factors)

    def bases(self) -> tuple[Tensor, ...]:
        if not self._factors:
            raise RuntimeError("projector used before its first refresh()")
        return self._factors

    def project(self, grad: Tensor) -> Tensor:
        """``G`` (d₁×…×d_N) → the core ``C = G ×₁ U₁ᵀ … ×_N U_Nᵀ`` (r₁×…×r_N)."""
        return multiply_modes(grad, tuple(factor.T for factor in self.bases()))

    def project_back(self, low: Tensor) -> Tensor:
        """The core ``C`` → ``C ×₁ U₁ … ×_N U_N`` (d₁×…×d_N)."""
        return multiply_modes(low, self.bases())

    def add_back_(self, target: Tensor, low: Tensor, alpha: float) -> Tensor:
        return target.add_(self.project_back(low), alpha=alpha)

    def state_dict(self) -> dict[str, Tensor]:
        return {**super().state_dict(), **{f"factor{mode}": factor for mode, factor in enumerate(self._factors)}}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        count = sum(key.startswith("factor") for key in state)
        self._factors = tuple(state[f"factor{mode}"] for mode in range(count))


@hookimpl
def register_projectors(register) -> None:
    register("tucker", TuckerProjector)
