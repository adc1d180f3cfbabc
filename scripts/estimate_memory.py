"""Training memory per method for a LLaMA size: weights, gradients, optimizer states, total.

    python scripts/estimate_memory.py --model llama_7b
    python scripts/estimate_memory.py --model llama_7b --method q-galore galore8bit-layerwise --rank 1024

Shapes come from ``LlamaConfig`` on the meta device (nothing is allocated); bytes follow what
lit_lowrank stores (``lit_lowrank/memory.py``). Activations are not included.
"""

from __future__ import annotations

import argparse

import torch

from lit_lowrank.memory import LAYERWISE, METHODS, estimate, llama_on_meta, method
from lit_lowrank.models.llama import LLAMA_SIZES

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_RANKS = {"tiny": 16, "60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}  # GaLore's runs
DEFAULT_METHODS = [*METHODS, *(f"{name}{LAYERWISE}" for name in ("galore8bit", "q-galore", "gradnorm8bit"))]
GIB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama_7b", choices=[f"llama_{size}" for size in LLAMA_SIZES])
    parser.add_argument("--method", nargs="+", default=DEFAULT_METHODS,
                        help=f"any of {list(METHODS)}, each optionally with '{LAYERWISE}'")
    parser.add_argument("--rank", type=int, default=None, help="default: GaLore's rank for the size")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="weights, gradients, float states")
    args = parser.parse_args()
    for name in args.method:
        method(name)  # fail early on a typo, listing the valid names

    size = args.model.removeprefix("llama_")
    rank = args.rank or DEFAULT_RANKS[size]
    models = {gradnorm: llama_on_meta(size, dtype=DTYPES[args.dtype], gradnorm=gradnorm) for gradnorm in (False, True)}
    n_params = sum(p.numel() for p in models[False].parameters())
    print(f"LLaMA-{size}: {n_params / 1e9:.2f}B params, {args.dtype}, rank {rank}; GiB, activations excluded")
    print("| method | weights | gradients | optimizer states | total |")
    print("|---|---:|---:|---:|---:|")
    for name in args.method:
        result = estimate(models[method(name)[0].gradnorm], name, rank=rank)
        print(f"| {name} | {result.weights / GIB:.2f} | {result.gradients / GIB:.2f} | "
              f"{result.optimizer / GIB:.2f} | {result.total / GIB:.2f} |")


if __name__ == "__main__":
    main()
