"""Model reparameterizations that a low-rank optimizer trains (torch only; applied to any
``nn.Module`` before its optimizer is built): GradNormLoRP's weight normalization."""

from lit_lowrank.reparam.gradnorm import apply_gradnorm, fold_gradnorm, is_gradnorm

__all__ = ["apply_gradnorm", "fold_gradnorm", "is_gradnorm"]
