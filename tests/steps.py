"""A small low-rank optimizer and seeded gradients, for the tests of what a step changes."""

from __future__ import annotations

import torch
from torch import nn

from lit_lowrank import LowRankOptimizer


def weights_and_bias(shapes: dict[str, tuple[int, int]], **options) -> tuple[list[nn.Parameter], LowRankOptimizer]:
    """Low-rank weights of ``shapes`` (by name, drawn in order after ``manual_seed(0)``) and a
    dense bias of 6; rank 3 and update_gap 2 unless ``options`` say otherwise: steps 1 and 3
    refresh the subspaces."""
    torch.manual_seed(0)
    weights = [nn.Parameter(torch.randn(shape)) for shape in shapes.values()]
    bias = nn.Parameter(torch.randn(6))
    groups = [{"params": weights, "lowrank": True, "names": list(shapes)}, {"params": [bias], "names": ["bias"]}]
    options = {"rank": 3, "update_gap": 2, "lr": 1e-2, "weight_decay": 0.1, **options}
    return [*weights, bias], LowRankOptimizer(groups, **options)


def seeded_grads(params: list[torch.Tensor], seed: int) -> None:
    """A standard-normal gradient for every parameter, from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)


def assert_identical(a, b) -> None:
    """``a`` and ``b`` (nested dicts, lists and tensors) are bit-equal, NaN included."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_identical(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_identical(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    else:
        assert a == b
