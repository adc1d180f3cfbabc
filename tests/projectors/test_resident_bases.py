"""Regenerable bases (``random``, ``dct``): the dense matrix they cache is counted in
``state_bytes()``, and ``cache_basis: false`` trains bitwise the same without keeping it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_lowrank import LowRankOptimizer

SHAPE, RANK = (37, 53), 5  # std side: the left basis, 37×5


def _train(projector: str, rule: str, cache_basis: bool, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(*SHAPE, generator=generator).to(dtype))
    optimizer = LowRankOptimizer([{"params": [weight], "lowrank": True}], lr=1e-2, rank=RANK, update_gap=2,
                                 projector=projector, rule=rule, projector_args={"cache_basis": cache_basis})
    for _ in range(5):
        weight.grad = torch.randn(*SHAPE, generator=generator).to(dtype)
        optimizer.step()
    return weight.detach(), optimizer.state_bytes()


@pytest.mark.parametrize("projector, rule", [("random", "apollo"), ("random", "galore"), ("dct", "galore")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_basis_is_counted_and_not_caching_it_trains_the_same(projector, rule, dtype):
    cached, cached_bytes = _train(projector, rule, True, dtype)
    regenerated, regenerated_bytes = _train(projector, rule, False, dtype)
    assert torch.equal(cached, regenerated)
    basis = SHAPE[0] * RANK * torch.finfo(dtype).bits // 8  # the 37×5 basis in the weight's dtype
    assert cached_bytes["projectors"] - regenerated_bytes["projectors"] == basis
    assert cached_bytes["moments"] == regenerated_bytes["moments"]
