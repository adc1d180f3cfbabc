"""Projectors: how a gradient's subspace is found (SVD, randomized SVD, DCT, random, online PCA)."""

from lit_lowrank.projectors.base import SIDE_POLICIES, DenseBasisProjector, Projector, Side, choose_side

__all__ = ["SIDE_POLICIES", "DenseBasisProjector", "Projector", "Side", "choose_side"]
