"""The README's "optimizer state per target" formulas (Methods table), written out here, against
the bytes ``state_bytes()`` measures after a step, on weights that fill no 256-group exactly."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lit_lowrank import LowRankOptimizer
from lit_lowrank.optim.summary import summarize
from lit_lowrank.plugins import get_method
from lit_lowrank.transforms.int_weights import QuantizedLinear

def eight_bit(k: int, b: int) -> int:
    """Two Adam moments: 8-bit blockwise from k = 4096 elements on, else in the weight's dtype."""
    return 2 * (k + 4 * math.ceil(k / 256) + 16) if k >= 4096 else 2 * k * b


def groups(values: int) -> int:
    return math.ceil(values / 256)


# method: formula(k, d, r, b, max(m, n)), k = r·max(m, n), d = min(m, n), b bytes; the options are the
# registered method's (lit_lowrank/methods.py), so the table and the registry cannot drift apart
FORMULAS = {
    "galore": lambda k, d, r, b, big: 2 * k * b + r * d * b,
    "galore-rsvd": lambda k, d, r, b, big: 2 * k * b + r * d * b,
    "galore-warm": lambda k, d, r, b, big: 2 * k * b + r * d * b,
    "galore-dct": lambda k, d, r, b, big: 2 * k * b + 8 * r + r * d * b,
    "galore-random": lambda k, d, r, b, big: 2 * k * b + 16 + r * d * b,
    "online-pca": lambda k, d, r, b, big: 2 * k * b + r * d * b,
    "fira": lambda k, d, r, b, big: 2 * k * b + r * d * b,
    "apollo": lambda k, d, r, b, big: 2 * k * b + 16 + r * d * b,
    "apollo-mini": lambda k, d, r, b, big: 2 * big * b + 16 + d * b,
    "galore-adafactor": lambda k, d, r, b, big: 4 * (r + big) + r * d * b,
    "galore-lion": lambda k, d, r, b, big: k * b + r * d * b,
    "snsm": lambda k, d, r, b, big: k * b + 4 * big + r * d * b,
    "galore-sn": lambda k, d, r, b, big: k * b + 4 * big + r * d * b,
    "galore-8bit": lambda k, d, r, b, big: eight_bit(k, b) + r * d * b,
    "q-galore": lambda k, d, r, b, big: eight_bit(k, b) + 256 * groups(d * r) // 2 + 8 * groups(d * r) + 16,
}
VARIANTS = {  # options beyond the registered methods: formula
    "adafactor-beta1": ({"inner": "adafactor", "inner_args": {"beta1": 0.9}},
                        lambda k, d, r, b, big: 4 * (r + big) + 4 * k + r * d * b),
}


def options_and_formula(name: str):
    return VARIANTS[name] if name in VARIANTS else (get_method(name).options, FORMULAS[name])


def one_weight(shape: tuple[int, int], dtype: torch.dtype, options: dict) -> tuple[nn.Linear, LowRankOptimizer]:
    """A linear layer with an m×n weight (random, seeded) and the optimizer projecting it."""
    layer = nn.Linear(shape[1], shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(*shape, generator=torch.Generator().manual_seed(0)))
    layer.to(dtype)
    return layer, LowRankOptimizer([{"params": [layer.weight], "lowrank": True}], **options)


def low_rank_bytes(states: dict[str, int]) -> int:
    return states["moments"] + states["projectors"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, rank", [((37, 53), 5), ((300, 129), 16), ((129, 300), 16)])
@pytest.mark.parametrize("name", [*FORMULAS, *VARIANTS])
def test_state_formula_equals_measured_and_predicted_bytes(name, shape, rank, dtype):
    """The formula against ``state_bytes()`` after a step and against the components' own
    prediction before it (``summarize``, what the estimator uses)."""
    options, formula = options_and_formula(name)
    layer, optimizer = one_weight(shape, dtype, {"rank": rank, **options})
    predicted = summarize(layer, optimizer).states
    layer.weight.grad = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    optimizer.step()
    r = options.get("rank", rank)
    b = torch.finfo(dtype).bits // 8
    expected = formula(r * max(shape), min(shape), r, b, max(shape))
    assert low_rank_bytes(optimizer.state_bytes()) == expected
    assert low_rank_bytes(predicted) == expected


@pytest.mark.parametrize("subsets", ["rows", "columns"])
@pytest.mark.parametrize("shape", [(37, 53), (300, 129)])
def test_subset_norms_of_rows_or_columns_of_r(subsets, shape):
    """GaLore-SN over R's rows or columns: R is m×r (m ≥ n) or r×n, one float32 norm per row or
    column of it beside Adam's first moment."""
    m, n, r = *shape, 5
    low_shape = (m, r) if m >= n else (r, n)
    expected = 4 * r * max(m, n) + 4 * low_shape[0 if subsets == "rows" else 1] + 4 * r * min(m, n)
    layer, optimizer = one_weight(shape, torch.float32, {"rank": r, "inner": "adamw-sn",
                                                          "inner_args": {"subsets": subsets}})
    predicted = summarize(layer, optimizer).states
    layer.weight.grad = torch.randn(*shape)
    optimizer.step()
    assert low_rank_bytes(optimizer.state_bytes()) == low_rank_bytes(predicted) == expected


@pytest.mark.parametrize("shape", [(37, 53), (300, 129)])
def test_int8_weight_formula_equals_its_buffers(shape):
    """Q-GaLore's weight: ⌈m·n⌉₂₅₆ code bytes + 8 per group (scale, minimum) + 16 (shape)."""
    layer = QuantizedLinear(shape[1], shape[0], bias=False)
    stored = sum(buffer.numel() * buffer.element_size() for buffer in layer.buffers())
    assert stored == 256 * groups(shape[0] * shape[1]) + 8 * groups(shape[0] * shape[1]) + 16
