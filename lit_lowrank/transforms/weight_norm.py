"""The ``weight-norm`` transform: GradNormLoRP's reparameterization (Huang et al. 2024, arXiv 2412.19616, §3): each target
linear weight becomes ``W = g · V / ‖V‖`` with one norm per output unit — Weight Normalization
(Salimans & Kingma 2016, Eq. 2), the paper's column norm ``‖·‖_c`` of a d×k weight, i.e. the
row norm of ``nn.Linear``'s out×in ``weight`` — built on
``torch.nn.utils.parametrizations.weight_norm(dim=0)``.

Training (a model transform applied before the optimizer is built; usable from any loop):

* ``apply_gradnorm(model, targets)`` parametrizes the target ``nn.Linear`` weights: the magnitude
  ``g`` (out×1, ``…parametrizations.weight.original0``) and the direction ``V`` (out×in,
  ``…original1``), initialised so that ``W`` is unchanged;
* autograd gives the weight-norm gradients (Salimans & Kingma, Eq. 3):
  ``∇g = Σ_j G_ij V_ij / ‖V_i‖`` and ``∇V_i = (g_i / ‖V_i‖) (G_i − (∇g_i / ‖V_i‖) V_i)``;
* :func:`lit_lowrank.build_optimizer` projects ``V`` GaLore-style (it takes the original of the
  weight's shape of a parametrized weight) and trains ``g`` with dense AdamW; ``inner="adamw8bit"``
  keeps the low-rank moments in 8 bits (the paper's 8-bit GradNormLoRP).

Inference: ``fold_gradnorm(model)`` writes ``g · V / ‖V‖`` back as a plain ``weight`` parameter,
so the model has no extra cost.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm, weight_norm

from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.targets import linear_targets
from lit_lowrank.transforms.base import Transform


def apply_gradnorm(
    model: nn.Module,
    targets: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> nn.Module:
    """Weight-normalize the target layers of :func:`lit_lowrank.select_targets` (same ``targets``
    and ``exclude``), in place; they must all be ``nn.Linear``.
    Layers already weight-normalized are left as they are, so applying it twice is harmless.

    Returns:
        ``model``, whose target ``weight`` is now computed as ``g · V / ‖V‖`` (norm over each
        output row, ``g`` and ``V`` shaped out×1 and out×in).

    Raises:
        ValueError: if there is no target (training would silently be plain GaLore), a target
            is not an ``nn.Linear`` (its norm axis would be another), or a target's weight is tied
            to another module's (weight-normalizing one use would untie them).
    """
    for module in linear_targets(model, targets, exclude, "weight-norm normalizes").values():
        if not is_gradnorm(module):
            weight_norm(module, name="weight", dim=0)
    return model


def fold_gradnorm(model: nn.Module) -> nn.Module:
    """Replace every weight-normalized ``weight`` by the plain parameter ``g · V / ‖V‖``
    (in place); other parametrizations are left alone.

    Returns:
        ``model`` with ordinary ``nn.Linear`` weights, giving the same outputs.
    """
    for module in model.modules():
        if is_gradnorm(module):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


def is_gradnorm(module: nn.Module) -> bool:
    """Whether ``module.weight`` is weight-normalized by :func:`apply_gradnorm`."""
    if not parametrize.is_parametrized(module, "weight"):
        return False
    chain = module.parametrizations.weight
    return len(chain) == 1 and isinstance(chain[0], _WeightNorm)


class WeightNorm(Transform):
    """``weight-norm``: GradNormLoRP's ``W = g · V / ‖V‖`` on the target linear weights (no
    options); undone by :func:`fold_gradnorm`. It replaces the weight parameters, so a Lightning
    module must hold it before its ``configure_optimizers`` runs."""

    name = "weight-norm"
    changes_targets = True
    needs_whole_weights = True  # the norm of each output row needs the whole row
    tolerance = 1e-5
    adopts_modules = False
    estimated_applied = True  # g and V replace each target weight

    def apply(self, model: nn.Module, targets: Sequence[str] | None, exclude: Sequence[str]) -> list[str]:
        before = {module for module in model.modules() if is_gradnorm(module)}
        apply_gradnorm(model, targets, exclude)
        return [name for name, module in model.named_modules() if is_gradnorm(module) and module not in before]

    def applied(self, model: nn.Module) -> bool:
        return any(is_gradnorm(module) for module in model.modules())

    def undo(self, model: nn.Module) -> nn.Module:
        return fold_gradnorm(model)

    def describe(self) -> str:
        return "weight-normalized targets"

    def fix(self) -> str:
        return f"lit_lowrank.transforms.weight_norm.apply_gradnorm(model) (or {super().fix()})"


@hookimpl
def register_transforms(register: Any) -> None:
    register(WeightNorm.name, WeightNorm)
