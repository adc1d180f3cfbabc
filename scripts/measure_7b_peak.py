"""The measured peak GPU memory of one layer-wise training step of LLaMA-7B (bf16 weights), next
to what ``scripts/estimate_memory.py`` predicts for weights, gradients and optimizer state —
the papers' claims: GaLore 8-bit with layer-wise updates trains 7B on a 24 GB card, Q-GaLore
under 16 GB.

    python scripts/measure_7b_peak.py                             # galore-8bit and q-galore, rank 1024
    python scripts/measure_7b_peak.py --methods q-galore --seq 256 --checkpointing

Needs a CUDA device (about 16–20 GB free). The peak is ``torch.cuda.max_memory_allocated`` over
two steps (the second with the optimizer state allocated); the estimate excludes activations,
so the difference is activations, autograd temporaries and the CUDA allocator's rounding.
"""

from __future__ import annotations

import argparse
from typing import Sequence

import torch

from lit_lowrank import build_optimizer, get_method, transforms
from lit_lowrank.memory import estimate
from lit_lowrank.models.llama import GALORE_RANKS, llama_config
from lit_lowrank.optim.layerwise import LayerwiseUpdates

GIB = 2**30


def peak_of_layerwise_steps(method: str, size: str, rank: int, seq: int, checkpointing: bool) -> tuple[int, int]:
    """``(measured peak bytes, estimated bytes without activations)`` of two layer-wise steps."""
    from transformers import LlamaForCausalLM

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    recipe = get_method(method)
    with torch.device("cuda"):
        model = LlamaForCausalLM(llama_config(size, max_seq_len=seq)).to(torch.bfloat16)
    transforms.prepare(model, recipe.transforms)
    if checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = build_optimizer(model, method=method, rank=rank, update_gap=200, lr=1e-3)
    LayerwiseUpdates(optimizer).attach()
    tokens = torch.randint(0, model.config.vocab_size, (1, seq), device="cuda")
    for _ in range(2):
        model(input_ids=tokens, labels=tokens).loss.backward()
    torch.cuda.synchronize()
    predicted = estimate(model, f"{method}-layerwise", rank=rank)
    return torch.cuda.max_memory_allocated(), predicted.total


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["galore-8bit", "q-galore"])
    parser.add_argument("--size", default="7b")
    parser.add_argument("--rank", type=int, default=None, help="default: the papers' rank for the size")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device: the peak is torch.cuda.max_memory_allocated")
    rank = args.rank or GALORE_RANKS[args.size]
    print(f"{torch.cuda.get_device_name()}; LLaMA-{args.size}, bf16, rank {rank}, 1×{args.seq} tokens, "
          f"layer-wise{', activation checkpointing' if args.checkpointing else ''}")
    print("| method | measured peak GiB | estimate GiB (no activations) | difference GiB |")
    print("|---|---:|---:|---:|")
    for method in args.methods:
        peak, predicted = peak_of_layerwise_steps(method, args.size, rank, args.seq, args.checkpointing)
        print(f"| {method}-layerwise | {peak / GIB:.2f} | {predicted / GIB:.2f} | {(peak - predicted) / GIB:.2f} |")


if __name__ == "__main__":
    main()
