"""Subset-Norm and Subspace-Momentum (Nguyen et al. 2025, "Efficient Adaptive Optimization via
Subset-Norm and Subspace-Momentum", AdamSNSM): momentum in the low-rank subspace, plain SGD in its
complement, and one adaptive step size per row (or column) of the weight."""

from __future__ import annotations

import torch
from torch import Tensor

from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.inner.subset_norm import accumulate_, check_subset_options, second_correction, subset_squares
from lit_lowrank.projectors.base import Projector
from lit_lowrank.rules.base import RuleInputs, UpdateRule


class SubsetNormRule(UpdateRule):
    """``U = √(1 − β2ᵗ) · (α · lift(N) + (G − lift(R))) / (√V + ε)``, ``W ← W − η U``, with
    ``V ← β2 V + (1 − β2) s(G)``, ``s(G)_i = Σ_j G_ij²`` over the subset i (one row or column);
    β2 = 1 sums instead (``V ← V + s(G)``, AdaGrad's norm) and drops the ``√(1 − β2ᵗ)``.

    ``lift`` is the projector's back-projection, so ``G − lift(R)`` is the gradient outside the
    subspace, stepped with plain SGD; ``N`` is the inner optimizer's direction — the ``momentum``
    inner's EMA ``M`` of R, whose ``1/(1 − β1ᵗ)`` correction scales the whole step, as in the
    authors' AdamSNSM. V keeps one float32 value per subset: per row (m×1) when ``subsets`` is
    ``rows``, per column (1×n) for ``columns``; ``auto`` (the paper's heuristic) sums along the
    shorter dimension, so V has max(m, n) values.

    Args:
        scale: α, multiplying the lifted momentum (1 in the paper).
        betas: ``(β1, β2)``; β2 ∈ [0, 1] is read here (β1 is the inner optimizer's).
        eps: ε added to √V (the authors' 1e-6).
        subsets: ``auto | rows | columns``.

    State: ``subset_norm`` (V, float32).
    """

    def __init__(self, scale: float = 1.0, *, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 subsets: str = "auto") -> None:
        super().__init__(scale)
        check_subset_options(betas[1], eps, subsets)
        self.beta2, self.eps, self.subsets = betas[1], eps, subsets

    def apply_(self, param: Tensor, inputs: RuleInputs, *, step_size: float) -> None:
        grad, state = inputs.grad, inputs.state
        squares = subset_squares(grad, self.subsets)
        if "subset_norm" not in state:
            state["subset_norm"] = torch.zeros_like(squares)
        elif state["subset_norm"].shape != squares.shape:  # a checkpoint saved with other subsets
            raise ValueError(f"the checkpoint's subset norms have shape {tuple(state['subset_norm'].shape)}, but "
                             f"subsets={self.subsets!r} gives {tuple(squares.shape)}: resume with the checkpoint's "
                             "rule_args subsets, or start afresh")
        norm = accumulate_(state["subset_norm"], squares, self.beta2)
        step = int(state["step"])
        update = inputs.projector.add_back_(grad.clone(), inputs.low, alpha=-1.0)  # G − lift(R), m×n
        inputs.projector.add_back_(update, inputs.direction, alpha=self.scale)
        update.div_((norm.sqrt() + self.eps).to(update.dtype))
        param.add_(update, alpha=-step_size * second_correction(self.beta2, step))

    def state_layout(self, grad: Tensor, low: Tensor, projector: Projector) -> dict:
        """V: one float32 value per subset of ``G``."""
        return {"subset_norm": subset_squares(grad, self.subsets)}


@hookimpl
def register_update_rules(register) -> None:
    register("snsm", SubsetNormRule)
