"""Activation memory with and without CompAct's compressed linear activations, on a small LLaMA.

Both figures are measured, not estimated:

* ``saved``: the bytes autograd keeps for backward during one forward pass: the storages of the
  tensors ``torch.autograd.graph.saved_tensors_hooks`` sees, each counted once (q/k/v's common
  input is one tensor), parameters excluded;
* ``peak``: the allocator's peak over the second step's forward and backward, relative to what
  was live before it (CUDA: ``max_memory_allocated``; CPU: ``torch.profiler`` memory events), as
  ``scripts/measure_layerwise_memory.py`` measures it.

It also times whole training steps (forward, backward and ``optimizer.step()``; median of 5
after the measured ones): CompAct adds x·Q in forward and replaces the m×n product gᵀx by the
m×r product gᵀz in backward.

Both runs use the same optimizer — the ``random`` projector on ``side: right`` at rank r, the
projection CompAct computes — so only the layers differ: plain ``nn.Linear`` saves each target
layer's input x (tokens×in), :class:`~lit_lowrank.transforms.compact.CompactLinear` saves x·Q (tokens×r).

    python scripts/measure_compact_memory.py --hidden 512 --layers 4 --seq 256 --batch 4 --rank 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from lit_lowrank import build_optimizer
from lit_lowrank.transforms.compact import bind_compact, compact_linear_layers
from measure_layerwise_memory import _measured, small_llama


def saved_activation_bytes(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    """Bytes of the storages autograd saves for backward during one forward of ``model``, each
    storage once, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(tokens, labels=tokens).loss
    loss.backward()
    return sum(storages.values())


def run(compact: bool, hidden: int, layers: int, vocab: int, tokens: torch.Tensor, rank: int) -> dict[str, int]:
    model = small_llama(hidden, layers, vocab).to(tokens.device)
    if compact:
        compact_linear_layers(model)
    optimizer = build_optimizer(model, projector="random", side="right", rank=rank, update_gap=200, lr=1e-3)
    if compact:
        bind_compact(model, optimizer)

    def forward_backward() -> None:
        model(tokens, labels=tokens).loss.backward()

    saved = saved_activation_bytes(model, tokens)  # step 1
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    peak = _measured(forward_backward, tokens.device)  # step 2, optimizer state already allocated
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"saved_bytes": saved, "peak_bytes": peak, "step_ms": 1e3 * statistics.median(
        step_seconds(forward_backward, optimizer, tokens.device) for _ in range(5))}


def step_seconds(forward_backward, optimizer: torch.optim.Optimizer, device: torch.device) -> float:
    """Wall time of one training step (synchronized on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    forward_backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(hidden: int = 256, layers: int = 2, vocab: int = 4096, batch: int = 2, seq: int = 128, rank: int = 32,
            device: str = "cpu") -> dict[str, Any]:
    tokens = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    plain, compact = (run(flag, hidden, layers, vocab, tokens, rank) for flag in (False, True))
    return {"device": device, "shape": dict(hidden=hidden, layers=layers, vocab=vocab, batch=batch, seq=seq, rank=rank),
            "plain": plain, "compact": compact,
            "saved_ratio": compact["saved_bytes"] / plain["saved_bytes"],
            "peak_ratio": compact["peak_bytes"] / plain["peak_bytes"],
            "step_ratio": compact["step_ms"] / plain["step_ms"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab-size", dest="vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps(measure(**vars(parser.parse_args(argv))), indent=2))


if __name__ == "__main__":
    main()
