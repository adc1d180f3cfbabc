"""Adaptive per-layer rank (in the spirit of WeLore, Jaiswal et al. 2024): each layer's rank is
the smallest r whose top-r singular values hold a fraction τ of its gradient's energy, capped
by a per-layer maximum and by a rank budget shared by the layers of one optimizer (its ledger)."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import Tensor

from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.projectors.base import DenseBasisProjector, Side
from lit_lowrank.quantizers.base import Quantizer
from lit_lowrank.projectors.svd import top_singular_bases

log = logging.getLogger(__name__)

def energy_rank(singular_values: Tensor, tau: float) -> int | None:
    """Smallest r with ``Σ_{i<r} σᵢ² ≥ τ Σ σᵢ²`` (σ sorted descending); None for a zero
    matrix, whose energy says nothing about the rank."""
    energy = singular_values.double().square()
    total = energy.sum()
    if total == 0:
        return None
    captured = torch.cumsum(energy, 0) / total
    return int(torch.searchsorted(captured, torch.tensor(tau, dtype=captured.dtype) - 1e-12)) + 1


class AdaptiveRankProjector(DenseBasisProjector):
    """Exact-SVD projector whose rank is chosen per layer at its first refresh.

    ``r = clamp(energy_rank(σ(G), τ), min_rank, rank)``, then reduced to what is left of
    ``budget`` (the sum of ranks over all layers sharing ``ledger``), never below
    ``min_rank``. The rank is then fixed (the moments are shaped by it); later refreshes take
    the top-r SVD as GaLore does. An all-zero first gradient (a layer that has not received a
    gradient yet) cannot measure τ: the layer gets its maximum, still cut by the budget, with a
    warning — never rank 1 for good. Layers are served in the order of their first refresh — the
    optimizer's parameter order — so with a budget smaller than the sum of the τ-ranks the
    later layers are the ones cut; every grant is logged (logger
    ``lit_lowrank.projectors.adaptive_rank``) and stored in the state dict.

    Args:
        rank: per-layer maximum (the optimizer's ``rank``).
        side, seed, quantizer, quantizer_args: as :class:`DenseBasisProjector` (seed is the
            parameter index and keys the layer's grant in the ledger).
        tau: energy fraction τ in (0, 1].
        budget: total rank over the layers sharing ``ledger``; ``None`` for no budget.
        min_rank: the least rank any layer gets.
        ledger: the ranks granted so far, by seed, shared by the layers of one budget: the
            optimizer offers its own (one per optimizer); a projector built alone keeps its own.

    State: the base state plus ``rank`` (granted), ``tau_rank`` (requested by τ) and
    ``energy`` (fraction of the first gradient's energy the granted rank holds).
    """

    def __init__(
        self, rank: int, *, side: str = "std", seed: int = 0, tau: float = 0.9, budget: int | None = None,
        min_rank: int = 1, ledger: dict[int, int] | None = None, quantizer: type[Quantizer] | None = None,
        quantizer_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(rank, side=side, seed=seed, quantizer=quantizer, quantizer_args=quantizer_args)
        if not 0 < tau <= 1:
            raise ValueError(f"tau must be in (0, 1], got {tau}")
        if not 1 <= min_rank <= rank:
            raise ValueError(f"min_rank must be in [1, rank={rank}], got {min_rank}")
        if budget is not None and budget < min_rank:
            raise ValueError(f"budget {budget} is below min_rank {min_rank}")
        self.tau = tau
        self.budget = budget
        self.min_rank = min_rank
        self.ledger = {} if ledger is None else ledger
        self.tau_rank = 0
        self.energy = float("nan")

    def fit(self, grad: Tensor, side: Side) -> tuple[Tensor | None, Tensor | None]:
        u, singular_values, vh = torch.linalg.svd(grad, full_matrices=False)
        if self.refreshes == 0:
            self._choose_rank(singular_values)
        return top_singular_bases(u, vh, self.rank, side)

    def _choose_rank(self, singular_values: Tensor) -> None:
        measured = energy_rank(singular_values, self.tau)
        if measured is None:
            warnings.warn(f"adaptive-rank layer {self.seed}: the first gradient is all zero, so τ cannot choose a "
                          f"rank; the layer keeps its maximum {self.rank} (within the budget)", stacklevel=2)
        self.tau_rank = self.rank if measured is None else measured
        wanted = min(max(self.tau_rank, self.min_rank), self.rank)
        ledger = self.ledger
        ledger.pop(self.seed, None)
        if self.budget is not None:
            left = self.budget - sum(ledger.values())
            if left < wanted:
                warnings.warn(f"adaptive-rank budget {self.budget} exhausted: layer "
                              f"{self.seed} gets rank {max(left, self.min_rank)} instead of {wanted}", stacklevel=2)
            wanted = max(min(wanted, left), self.min_rank)
        self.rank = ledger[self.seed] = wanted
        energy = singular_values.double().square()
        self.energy = float(energy[: self.rank].sum() / energy.sum()) if energy.sum() > 0 else 1.0
        log.info("adaptive-rank layer %d: rank %d (τ=%.3g asks %d, energy %.4f)",
                 self.seed, self.rank, self.tau, self.tau_rank, self.energy)

    def state_dict(self) -> dict[str, Tensor]:
        return {**super().state_dict(), "rank": torch.tensor(self.rank), "tau_rank": torch.tensor(self.tau_rank),
                "energy": torch.tensor(self.energy, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        self.rank, self.tau_rank, self.energy = int(state["rank"]), int(state["tau_rank"]), float(state["energy"])
        if self.refreshes:
            self.ledger[self.seed] = self.rank


@hookimpl
def register_projectors(register) -> None:
    register("adaptive-rank", AdaptiveRankProjector)
