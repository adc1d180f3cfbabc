"""Peak memory during backward, standard vs layer-wise updates, on a small LLaMA.

The peak is measured by the allocator, not estimated: on CUDA with
``torch.cuda.max_memory_allocated``, on CPU from ``torch.profiler``'s memory events (every
allocation and free with its size, summed in time order). It is taken over the second training
step's forward and backward (optimizer state already allocated), relative to the memory live
before it, so it
holds the activations, the gradients, the autograd temporaries and — in layer-wise mode — the
optimizer's own temporaries inside the hooks. The standard mode's optimizer step, after
backward, is not included.

With gradient accumulation it also reports what is held between micro-batches: the standard
mode keeps every gradient; layer-wise mode keeps ``r·max(m, n)`` per projected weight plus the
dense parameters' gradients.

    python scripts/measure_layerwise_memory.py --hidden 256 --layers 4 --vocab-size 8192
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from lit_lowrank import build_optimizer
from lit_lowrank.models import Llama
from lit_lowrank.optim.layerwise import LayerwiseUpdates


def backward_peak_bytes(model: nn.Module, tokens: torch.Tensor, *, layerwise: bool,
                        layerwise_args: dict[str, Any] | None = None, **options: Any) -> int:
    """Peak bytes allocated by the 2nd step's forward and backward, on top of what was live before
    (weights and optimizer state). The peak of a training step is reached during backward.
    ``layerwise_args`` go to :class:`LayerwiseUpdates` (``bucket_cap_mb`` under data parallel)."""
    optimizer = build_optimizer(model, **options)
    if layerwise:
        LayerwiseUpdates(optimizer, **(layerwise_args or {})).attach()
    def forward_backward() -> None:
        model(tokens, labels=tokens).loss.backward()

    for step in range(2):
        peak = _measured(forward_backward, tokens.device) if step == 1 else forward_backward()
        optimizer.step()  # a no-op in layer-wise mode: the hooks stepped and freed every gradient
        optimizer.zero_grad(set_to_none=True)
    return peak


def held_between_micro_batches(model: nn.Module, tokens: torch.Tensor, **options: Any) -> dict[str, int]:
    """What layer-wise gradient accumulation keeps between two micro-batches of a window that
    does not refresh the subspace: ``low_rank`` (the R_acc tensors) and ``full`` (dense grads)."""
    updates = LayerwiseUpdates(build_optimizer(model, **options), accumulation=2).attach()
    for _ in range(3):  # window 1 (first refresh: full gradients), then one micro-batch of window 2
        model(tokens, labels=tokens).loss.backward()
    return updates.accumulator_bytes()


def _measured(backward, device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        backward()
    return cpu_peak(prof)


def cpu_peak(prof: profile) -> int:
    """Largest running sum of the profiler's CPU allocation (+) and free (−) events."""
    live = peak = 0
    for event in sorted(_cpu_memory_events(prof), key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def cpu_left(prof: profile) -> int:
    """Bytes the profiler saw allocated and not freed (the sum of its CPU memory events): 0 for
    a backward that returns all it took, unless some memory was freed on a thread the profiler
    does not follow (a process group's worker)."""
    return sum(e.nbytes() for e in _cpu_memory_events(prof))


def _cpu_memory_events(prof: profile) -> list:
    return [e for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]


def gradient_bytes(model: nn.Module) -> dict[str, int]:
    """``total``: all trainable parameters' gradient bytes; ``largest``: the biggest one."""
    sizes = [p.numel() * p.element_size() for p in model.parameters() if p.requires_grad]
    return {"total": sum(sizes), "largest": max(sizes)}


def small_llama(hidden: int, layers: int, vocab: int, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama("tiny", vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                 num_heads=max(1, hidden // 64), num_layers=layers)


def measure(hidden: int = 128, layers: int = 2, vocab: int = 4096, batch: int = 2, seq: int = 64,
            rank: int = 32, device: str = "cpu") -> dict[str, Any]:
    tokens = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    options = dict(rank=rank, update_gap=200, scale=0.25, lr=1e-3)
    peaks = {mode: backward_peak_bytes(small_llama(hidden, layers, vocab).to(device), tokens,
                                       layerwise=mode == "layerwise", **options)
             for mode in ("standard", "layerwise")}
    grads = gradient_bytes(small_llama(hidden, layers, vocab))
    held = held_between_micro_batches(small_llama(hidden, layers, vocab).to(device), tokens, **options)
    return {"device": device, "shape": dict(hidden=hidden, layers=layers, vocab=vocab, batch=batch, seq=seq),
            "peak_standard_bytes": peaks["standard"], "peak_layerwise_bytes": peaks["layerwise"],
            "saved_bytes": peaks["standard"] - peaks["layerwise"], "gradient_bytes": grads["total"],
            "largest_gradient_bytes": grads["largest"],
            "accumulation_held_standard_bytes": grads["total"],
            "accumulation_held_layerwise_bytes": held}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab-size", dest="vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps(measure(**vars(parser.parse_args(argv))), indent=2))


if __name__ == "__main__":
    main()
