"""Optimizer step time and state memory on a real LLaMA shape, against torch AdamW in the same run.

    python scripts/bench_optim.py                      # LLaMA-60M, every method
    python scripts/bench_optim.py --size 130m --methods adamw galore fira

Each method gets the same model and the same fixed gradients; only ``optimizer.step()`` is
timed. The first step (which computes the projections) is reported separately as the refresh
cost; the steady-state figure is the median over ``--steps`` steps after ``--warmup`` steps, with
no refresh in between (T = 200). State MiB sums the real storage of every tensor the optimizer
holds (moments, bases, quantization scales), excluding scalar step counters.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

from lit_lowrank import LowRankOptimizer, build_optimizer
from lit_lowrank.models.llama import llama_config

GALORE = dict(rank=128, update_gap=200, scale=0.25, lr=0.01)

Factory = Callable[[nn.Module], torch.optim.Optimizer]


def _galore_torch(model: nn.Module) -> torch.optim.Optimizer:
    import galore_torch
    from lit_lowrank import select_targets

    targets, dense = select_targets(model)
    return galore_torch.GaLoreAdamW(
        [{"params": list(dense.values())},
         {"params": list(targets.values()), "rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}],
        lr=0.01, no_deprecation_warning=True,
    )


METHODS: dict[str, Factory] = {
    "adamw": lambda model: torch.optim.AdamW(model.parameters(), lr=1e-3),
    "adamw-fused": lambda model: torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True),
    "galore-torch": _galore_torch,
    "galore": lambda model: build_optimizer(model, **GALORE),
    "galore-unguarded": lambda model: build_optimizer(model, **GALORE, nonfinite="ignore"),
    "galore-rsvd": lambda model: build_optimizer(model, **GALORE, projector="rsvd"),
    "galore-dct": lambda model: build_optimizer(model, **GALORE, projector="dct"),
    "galore-online-pca": lambda model: build_optimizer(model, **GALORE, projector="online-pca", schedule="every-step"),
    "galore-8bit": lambda model: build_optimizer(model, **GALORE, inner="adamw8bit"),
    "q-galore": lambda model: build_optimizer(
        model, **GALORE, inner="adamw8bit", schedule="lazy",
        projector_args={"quantizer": "int", "quantizer_args": {"bits": 4, "group_size": 256}}),
    "galore-adafactor": lambda model: build_optimizer(model, **GALORE, inner="adafactor"),
    "galore-lion": lambda model: build_optimizer(model, **GALORE, inner="lion", inner_args={"betas": (0.9, 0.99)}),
    "fira": lambda model: build_optimizer(model, **GALORE, rule="fira"),
    "apollo": lambda model: build_optimizer(model, **{**GALORE, "scale": 1.0}, projector="random", rule="apollo"),
    "apollo-mini": lambda model: build_optimizer(model, **{**GALORE, "rank": 1}, projector="random",
                                                 rule="apollo-mini"),
}


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every non-scalar tensor reachable from the optimizer's state (peers included)."""
    if isinstance(optimizer, LowRankOptimizer):
        return sum(optimizer.state_bytes().values())
    seen: set[int] = set()

    def walk(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            if value.ndim == 0 or id(value) in seen:
                return 0
            seen.add(id(value))
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(walk(v) for v in value)
        if hasattr(value, "__dict__"):  # peer projector objects kept in the state
            return sum(walk(v) for v in vars(value).values())
        return 0

    return sum(walk(state) for state in optimizer.state.values())


def measure(model: nn.Module, factory: Factory, warmup: int, steps: int) -> dict[str, float]:
    optimizer = factory(model)
    start = time.perf_counter()
    optimizer.step()
    first = time.perf_counter() - start
    for _ in range(warmup):
        optimizer.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    steady = statistics.median(times)
    return {"ms": steady * 1e3, "refresh_ms": max(first - steady, 0.0) * 1e3, "mib": state_bytes(optimizer) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="60m")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(args.size))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    n_params = sum(p.numel() for p in model.parameters())
    device = "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    print(f"LLaMA-{args.size}: {n_params / 1e6:.1f}M params, {device}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; median of {args.steps} steps after {args.warmup + 1}")
    results = {}
    for name in args.methods:
        try:
            results[name] = measure(model, METHODS[name], args.warmup, args.steps)
        except ImportError as exc:
            print(f"  {name}: skipped ({exc})")
    base = results.get("adamw")
    print(f"| method | step ms | × adamw | first-step extra ms (refresh) | state MiB | × adamw |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        ratio_ms = r["ms"] / base["ms"] if base else float("nan")
        ratio_mib = r["mib"] / base["mib"] if base else float("nan")
        print(f"| {name} | {r['ms']:.1f} | {ratio_ms:.2f} | {r['refresh_ms']:.0f} | {r['mib']:.1f} | {ratio_mib:.3f} |")


if __name__ == "__main__":
    main()
