"""How a projected weight is seen as matrices: its layout.

* ``matrix``  — a 2-D weight W (m×n): a linear layer's.
* ``experts`` — a stack of E expert matrices (E×m×n) in one parameter, as transformers' fused
  MoE experts keep them (``MixtralExperts.gate_up_proj``). Each slice gets its own basis; the
  projector, rule and inner optimizer work on the whole stack at once (batched SVD and
  matmuls, no loop over experts), so the components must declare ``batched = True``.
* ``kernel``  — a convolution kernel (out×in×k₁×…): projected as its out × (in·k₁·…)
  matricization (a view of the kernel), unless the projector projects tensors itself
  (``Projector.projects_tensors``: the Tucker projector).

The optimizer keeps a param group's layout under the group key ``layout`` (``matrix`` when
absent); :func:`~lit_lowrank.build_optimizer` puts each target in the group of its layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

LAYOUTS = ("matrix", "experts", "kernel")
_NDIM = {"matrix": "2-D (m×n)", "experts": "3-D (E×m×n)", "kernel": "at least 3-D (out×in×k…)"}


def check_layout(layout: object, p: Tensor) -> None:
    """Refuse a layout name that is not one of :data:`LAYOUTS`, or a parameter it cannot hold."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    fits = {"matrix": p.ndim == 2, "experts": p.ndim == 3, "kernel": p.ndim >= 3}[layout]
    if not fits:
        hint = ("; set the group's layout: experts (a 3-D stack of E matrices, E×m×n) or kernel (a conv "
                "weight, matricized out × in·k…) — a Conv1d kernel is 3-D too; build_optimizer sets it from the "
                "module that owns the weight" if p.ndim >= 3 and layout == "matrix" else "")
        raise ValueError(f"a param group with layout {layout!r} takes {_NDIM[layout]} weights, got shape "
                         f"{tuple(p.shape)}{hint}")
    if layout == "kernel" and not p.is_contiguous():
        raise ValueError(f"a {tuple(p.shape)} kernel in another memory format (channels_last?) cannot be viewed as "
                         "out × (in·k…) in place; keep the conv weights contiguous")


def target_layout(answer: object, p: Tensor) -> str | None:
    """The layout an ``is_target`` answer gives ``p`` (None: dense): a layout name as is, and
    ``True`` for a 2-D weight ``matrix`` (a callable that only says yes or no cannot tell a
    stack of experts from a Conv1d kernel, so such weights stay dense)."""
    if isinstance(answer, str):
        return answer
    return "matrix" if answer and p.ndim == 2 else None


@dataclass(frozen=True)
class View:
    """The shape the projector, rule and inner optimizer see for one weight (``shape``:
    m×n, E×m×n, the kernel's out×(in·k…) or, for a tensor projector, the kernel's own)."""

    shape: torch.Size

    @classmethod
    def of(cls, p: Tensor, layout: str, tensor_projector: bool = False) -> View:
        if layout == "kernel" and not tensor_projector:
            return cls(torch.Size((p.shape[0], math.prod(p.shape[1:]))))
        return cls(p.shape)

    @property
    def matrix(self) -> tuple[int, int]:
        """``(m, n)`` of each matrix (the last two dimensions)."""
        return self.shape[-2], self.shape[-1]

    @property
    def count(self) -> int:
        """How many m×n matrices: E for a stack of experts, else 1."""
        return math.prod(self.shape[:-2])

    def __call__(self, tensor: Tensor) -> Tensor:
        """``tensor`` (a gradient, in the weight's shape) in this view's shape."""
        return tensor if tensor.shape == self.shape else tensor.reshape(self.shape)

    def weight(self, tensor: Tensor) -> Tensor:
        """The weight ``tensor`` in this view's shape, sharing its storage, so that in-place
        updates reach the parameter; never a copy."""
        if tensor.shape == self.shape:
            return tensor
        try:
            return tensor.view(self.shape)
        except RuntimeError as error:
            raise RuntimeError(f"a {tuple(tensor.shape)} kernel can no longer be viewed as {tuple(self.shape)} in "
                               "place (its memory format changed after the optimizer was built, e.g. to "
                               "channels_last); keep conv weights contiguous") from error

    def back(self, tensor: Tensor, like: Tensor) -> Tensor:
        """``tensor`` (this view's shape) in ``like``'s shape."""
        return tensor if tensor.shape == like.shape else tensor.reshape(like.shape)
