"""Training memory per method for a LLaMA size: weights, gradients, optimizer states, total.

    python scripts/estimate_memory.py --size 7b
    python scripts/estimate_memory.py --size 7b --methods q-galore galore-8bit-layerwise --rank 1024

Shapes come from ``LlamaConfig`` on the meta device (nothing is allocated); bytes follow what
lit_lowrank stores, the optimizer state predicted by each method's own components
(``lit_lowrank/memory.py``). Methods are the registered ones, plugins' included (``python -m
lit_lowrank plugins``), and the full-rank baselines; a method whose state cannot be predicted
on the meta device gets a row of ``unknown`` and the reason below the table. Activations are
not included.
"""

from __future__ import annotations

import argparse

import torch

from lit_lowrank import registered
from lit_lowrank.memory import BASELINES, LAYERWISE, applied_for_estimate, estimate, llama_on_meta, method
from lit_lowrank.models.llama import GALORE_RANKS, LLAMA_SIZES

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LAYERWISE_ROWS = ("galore-8bit", "q-galore", "gradnorm-8bit")
GIB = 2**30


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="7b", choices=list(LLAMA_SIZES))
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"baselines and registered methods (plugins' too), each optionally with '{LAYERWISE}' "
                             "(default: all of them, and a few layer-wise rows)")
    parser.add_argument("--rank", type=int, default=None, help="default: GaLore's rank for the size")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="weights, gradients, float states")
    args = parser.parse_args(argv)
    names = args.methods or [*BASELINES, *registered("methods"), *(f"{name}{LAYERWISE}" for name in LAYERWISE_ROWS)]
    for name in names:
        method(name)  # fail early on a typo, listing the valid names

    size = args.size
    rank = args.rank or GALORE_RANKS[size]
    models: dict[str, torch.nn.Module] = {}  # by the transforms a model must hold to be estimated

    def model_for(recipe):
        transforms = applied_for_estimate(recipe)
        if repr(transforms) not in models:
            models[repr(transforms)] = llama_on_meta(size, dtype=DTYPES[args.dtype], transforms=transforms)
        return models[repr(transforms)]

    n_params = sum(p.numel() for p in model_for(None).parameters())
    print(f"LLaMA-{size}: {n_params / 1e9:.2f}B params, {args.dtype}, rank {rank}; GiB, activations excluded")
    print("| method | weights | gradients | optimizer states | total |")
    print("|---|---:|---:|---:|---:|")
    unknown = []
    for name in names:
        recipe = method(name)[0]
        try:
            result = estimate(model_for(recipe), name, rank=rank)
        except ValueError as error:  # components that need real values (adaptive-rank)
            unknown.append(str(error))
            print(f"| {name} | unknown | unknown | unknown | unknown |")
            continue
        print(f"| {name} | {result.weights / GIB:.2f} | {result.gradients / GIB:.2f} | "
              f"{result.optimizer / GIB:.2f} | {result.total / GIB:.2f} |")
    for error in unknown:
        print(f"\n{error}")


if __name__ == "__main__":
    main()
