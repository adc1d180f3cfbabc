"""Plain references the tests compare against, written out once: the top-r SVD basis and Adam's
bias-corrected moments on a low-rank gradient (Kingma & Ba, Alg. 1), as the papers state them.
Importable from any test (``tests/`` is on ``sys.path`` through its conftest)."""

from __future__ import annotations

import torch
from torch import Tensor


def svd_basis(grad: Tensor, rank: int, right: bool) -> Tensor:
    """GaLore's projection: the top-``rank`` right (n×r) or left (m×r) singular vectors of ``grad``."""
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    return vh[:rank].T if right else u[:, :rank]


class AdamMoments:
    """``M ← β1 M + (1−β1) R``, ``V ← β2 V + (1−β2) R²``, ``N = M̂ / (√V̂ + ε)``."""

    def __init__(self, betas: tuple[float, float], eps: float) -> None:
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.exp_avg = self.exp_avg_sq = None

    def direction(self, low: Tensor, t: int) -> Tensor:
        """N after the ``t``-th (1-based) update with ``low``."""
        if self.exp_avg is None:
            self.exp_avg, self.exp_avg_sq = torch.zeros_like(low), torch.zeros_like(low)
        self.exp_avg = self.beta1 * self.exp_avg + (1 - self.beta1) * low
        self.exp_avg_sq = self.beta2 * self.exp_avg_sq + (1 - self.beta2) * low * low
        m_hat = self.exp_avg / (1 - self.beta1**t)
        v_hat = self.exp_avg_sq / (1 - self.beta2**t)
        return m_hat / (v_hat.sqrt() + self.eps)
