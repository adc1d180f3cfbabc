"""``first_nonfinite``: exact, whatever the dtype, and not fooled by sums that overflow."""

from __future__ import annotations

import torch

from lit_lowrank.optim.guard import first_nonfinite


def test_finds_the_first_nan_or_inf_in_any_dtype():
    finite = [torch.randn(3, 4), torch.randn(5, dtype=torch.bfloat16)]
    assert first_nonfinite(finite) is None and first_nonfinite([]) is None
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        for bad in (float("nan"), float("inf"), float("-inf")):
            tensor = torch.zeros(2, 3, dtype=dtype)
            tensor[1, 2] = bad
            assert first_nonfinite([*finite, tensor, tensor.clone()]) == 2, (dtype, bad)
    assert first_nonfinite([torch.tensor([float("inf"), float("-inf")])]) == 0  # a sum would give NaN anyway


def test_large_finite_values_are_not_flagged():
    huge = [torch.full((4,), 3e38), torch.full((8,), 6e4, dtype=torch.float16),
            torch.full((2,), 1e300, dtype=torch.float64)]
    assert first_nonfinite(huge) is None
