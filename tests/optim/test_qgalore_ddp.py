"""Q-GaLore (``method="q-galore"``: INT8 weights re-quantized with stochastic rounding, an INT4
basis, 8-bit moments, lazy refresh) trained under plain PyTorch ``DistributedDataParallel`` on 2
gloo processes, as docs/scaling.md tells: ``sync_module_states(model)``, then
``DistributedDataParallel(model, init_sync=False)``; with DDP's own all-reduce and with
``lowrank_comm_hook``. Each rank starts from other weights and trains on other batches. Both end
with the same stored weights and optimizer state, bit for bit, and those are what one process
computes from rank 0's weights stepping with the average of the two ranks' gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lit_lowrank import build_optimizer, plugins, transforms
from lit_lowrank.optim.communication import LowRankCommunication, lowrank_comm_hook, sync_module_states
from ranks import requires_gloo, run_ranks

METHOD = "q-galore"
STEPS = 5
OPTIONS = {"rank": 4, "update_gap": 2, "lr": 0.01, "inner_args": {"min_8bit_size": 1}}
"""Refreshes at steps 0, 2 and 4 (a refresh after the first: the basis is refit from averaged
gradients); lr 0.01 moves the INT8 weights by several quantization steps; 8-bit moments for
these small ``R`` too (by default tensors under 4096 entries keep float moments)."""
BATCH = 8
TARGETS = ["0", "2"]
"""The hidden layers: INT8 weights stepped in low rank; the head is dense."""


def _net(seed: int) -> nn.Module:
    """A seeded MLP (32 → 32 → 32 → 4) holding Q-GaLore's INT8 hidden weights."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    transforms.prepare(net, plugins.get_method(METHOD).transforms, TARGETS)
    return net


def _optimizer(net: nn.Module) -> torch.optim.Optimizer:
    """``build_optimizer(net, method="q-galore")`` over ``net`` (its weights, not a DDP wrapper's), bound."""
    optimizer = build_optimizer(net, method=METHOD, targets=TARGETS, **OPTIONS)
    transforms.bind(net, plugins.get_method(METHOD).transforms, optimizer)
    return optimizer


def _batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank ``rank``'s :data:`STEPS` batches (:data:`BATCH` × 32 → :data:`BATCH` × 4), other on each rank."""
    generator = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(BATCH, 32, generator=generator), torch.randn(BATCH, 4, generator=generator))
            for _ in range(STEPS)]


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, batches) -> None:
    """One MSE step (mean over the batch) per batch."""
    for inputs, targets in batches:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()


def _flat(value, prefix: str = "") -> dict[str, object]:
    """A nested state (dicts, lists, tensors, numbers) as ``{path: leaf}``."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}/{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{prefix}/{i}").items()}
    return {prefix: value}


def _state(net: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, object]]:
    """What a rank ends with: the model's state dict (INT8 codes, scales, offsets, rounding
    counters, float biases), each stored weight's dequantized float weight, the optimizer's state."""
    floats = {name: transforms.stored_weight(p).float_weight()
              for name, p in net.named_parameters() if transforms.stored_weight(p) is not None}
    return {"model": _flat(net.state_dict()), "float_weights": floats,
            "optimizer": _flat(optimizer.state_dict()["state"])}


def _worker(rank: int, world_size: int, hook: bool, out: str) -> None:
    net = _net(seed=rank)  # other weights on each rank: the sync must make them rank 0's
    sync_module_states(net)
    ddp = DistributedDataParallel(net, init_sync=False)
    optimizer = _optimizer(net)
    if hook:
        ddp.register_comm_hook(LowRankCommunication(optimizer), lowrank_comm_hook)
    _train(ddp, optimizer, _batches(rank))
    torch.save({**_state(net, optimizer), "comm_bytes": getattr(optimizer, "comm_bytes", 0)}, f"{out}/state{rank}.pt")


def _reference(batches) -> dict[str, dict[str, object]]:
    """One process: rank 0's weights trained on ``batches`` (the ranks' batches concatenated, so
    the mean loss's gradient is the average of the ranks' mean-loss gradients)."""
    net = _net(seed=0)
    optimizer = _optimizer(net)
    _train(net, optimizer, batches)
    return _state(net, optimizer)


def _concatenated() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.cat([x0, x1]), torch.cat([y0, y1])) for (x0, y0), (x1, y1) in zip(_batches(0), _batches(1))]


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s bytes (bitwise comparison: NaN slots of the lazy schedule's queue included)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def _assert_identical(ours: dict, theirs: dict, what: str) -> None:
    assert ours.keys() == theirs.keys(), what
    for key, value in theirs.items():
        if isinstance(value, torch.Tensor):
            assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, (what, key)
            assert torch.equal(_bytes(ours[key]), _bytes(value)), (what, key)
        else:
            assert ours[key] == value, (what, key)


def _assert_close(ours: dict, theirs: dict, what: str) -> None:
    """Float tensors within 1e-5 of their magnitude, the rest (codes, counters, schedule) equal."""
    assert ours.keys() == theirs.keys(), what
    for key, value in theirs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            scale = max(value.nan_to_num().abs().max().item(), 1e-12) if value.numel() else 1.0  # queue: NaN = empty
            torch.testing.assert_close(ours[key], value, rtol=0, atol=1e-5 * scale, equal_nan=True,
                                       msg=f"{what} {key}")
        elif isinstance(value, torch.Tensor):
            assert torch.equal(ours[key], value), (what, key)
        else:
            assert ours[key] == value, (what, key)


@pytest.mark.slow
@requires_gloo
@pytest.mark.parametrize("hook", [False, True], ids=["allreduce", "lowrank_hook"])
def test_qgalore_trains_under_ddp_as_one_process_on_the_averaged_gradient(hook, tmp_path):
    """(a) both ranks end bitwise identical; (b) they match the one-process reference.

    Tolerance of (b): the two computations differ only in the order of floating-point sums (each
    rank's mean over 8 rows, then DDP's average of the two, against one mean over 16 rows), a
    relative ~1e-7 in the gradient. Every quantization in the step (the INT4 basis, the 8-bit
    moments, the INT8 weights' stochastic rounding, whose noise is seeded per layer and update,
    the same in both) then rounds the same way unless a value lands within ~1e-7 of a rounding
    threshold, and a flipped rounding shows as a whole quantization step (1/255 of a group's range
    for INT8, more for INT4 and 8-bit moments): 1e-5 of each tensor's magnitude admits the
    summation order (at most 2.3e-6 measured, in the lazy schedule's similarities) and no flipped
    code; the codes of weights, basis and moments and all counters must be equal."""
    run_ranks(_worker, hook, str(tmp_path))
    results = [torch.load(tmp_path / f"state{rank}.pt") for rank in (0, 1)]
    for part in ("model", "float_weights", "optimizer"):
        _assert_identical(results[1][part], results[0][part], f"rank 1 vs rank 0 {part}")
    reference = _reference(_concatenated())
    for part in ("model", "float_weights", "optimizer"):
        _assert_close(results[0][part], reference[part], f"ranks vs reference {part}")
    assert ((results[0]["comm_bytes"] or 0) > 0) == hook  # the hook sent R (None: no hook)

    # the checks can fail: rank 1 started elsewhere, the weights moved, and the average matters
    start, rank_one_start = _state(_net(0), _optimizer(_net(0))), _state(_net(1), _optimizer(_net(1)))
    assert not torch.equal(rank_one_start["float_weights"]["0.weight"], start["float_weights"]["0.weight"])
    assert not torch.equal(reference["float_weights"]["0.weight"], start["float_weights"]["0.weight"])
    rank_zero_alone = _reference(_batches(0))
    assert not torch.allclose(rank_zero_alone["float_weights"]["0.weight"], reference["float_weights"]["0.weight"],
                              rtol=0, atol=1e-3)
    refreshes = [v for k, v in reference["optimizer"].items() if k.endswith("refreshes")]
    assert refreshes and all(int(count) >= 2 for count in refreshes), refreshes
