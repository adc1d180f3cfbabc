"""FSDP2 (``fully_shard``): optimizer state per rank, step time and the optimizer's own traffic,
torch AdamW against the low-rank methods, measured on 2 gloo processes; and on paper for the
papers' LLaMA sizes, what the low-rank step adds to FSDP's own traffic.

    python scripts/bench_fsdp.py                          # measured on LLaMA-60M; on paper: 60M, 1B, 7B
    python scripts/bench_fsdp.py --size tiny --steps 3 --paper 1b

Measured: each of 2 CPU processes (gloo over loopback, one thread each) trains the same LLaMA,
sharded with :func:`lit_lowrank.shard_blocks` (each decoder layer, then the root), on
its own sequences, with each method from the same initial weights and data. One step = forward,
backward (FSDP's all-gathers and reduce-scatter) and optimizer step; times are medians over the
``--steps`` after ``--warmup``, of steps that do not refresh (T = 1000 after the first step) and
of the first step (a refresh). ``state`` is rank 0's optimizer state (its part of the moments
and the whole bases); ``optimizer MiB`` what the low-rank step exchanged itself
(``optimizer.comm_bytes``, counted at :class:`~lit_lowrank.optim.sharding.RowShard`'s collectives:
a refresh's gather of G on its owner and the owner's broadcast of the new basis (refresh
sharing), the all-reduce of a left projection's R and the all-gather of its N, the limiter's
norms, the ranks' agreement on non-finite gradients).

On paper, per step amortized over T = 200: the refresh's all-gather of each target's gradient,
plus ``r·n`` numbers all-reduced and all-gathered per left-projected target every step, against
FSDP's own traffic (two all-gathers of the weights and one reduce-scatter of the gradients).
"""

import statistics
import time
from typing import Any

import torch

from lit_lowrank import build_optimizer, select_targets, shard_blocks
from lit_lowrank.models.llama import GALORE_RANKS, llama_config
from lit_lowrank.projectors.base import Side, choose_side
from two_ranks import measure_on_two_ranks, parser

METHODS = ("adamw", "galore", "fira", "apollo", "apollo-mini")
MiB = 2**20


# ------------------------------------------------------------------ measured
def _optimizer(model: torch.nn.Module, method: str, size: str) -> torch.optim.Optimizer:
    if method == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    rank = 1 if method == "apollo-mini" else GALORE_RANKS[size]
    return build_optimizer(model, method=method, rank=rank, update_gap=1000, lr=1e-3)


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    if hasattr(optimizer, "state_bytes"):
        return sum(optimizer.state_bytes().values())
    return sum(t.to_local().numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if isinstance(t, torch.Tensor) and t.ndim > 0)


def _run_method(method: str, size: str, tokens: list[torch.Tensor], warmup: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = shard_blocks(LlamaForCausalLM(llama_config(size, vocab_size=1024)), init_device_mesh("cpu", (2,)))
    optimizer = _optimizer(model, method, size)
    times, sent = [], []
    for batch in tokens:
        start = time.perf_counter()
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
        sent.append(getattr(optimizer, "comm_bytes", 0))
    return {"refresh_time": times[0], "time": statistics.median(times[warmup:]), "refresh_bytes": sent[0],
            "bytes": statistics.median(sent[warmup:]), "state": _state_bytes(optimizer)}


def _run_all(size: str, tokens: list[torch.Tensor], warmup: int) -> dict[str, dict[str, Any]]:
    return {method: _run_method(method, size, tokens, warmup) for method in METHODS}


def measure(size: str = "60m", steps: int = 5, warmup: int = 2, seq: int = 128) -> dict[str, dict[str, Any]]:
    """Per method: rank 0's state bytes, step times and the optimizer's own traffic."""
    return measure_on_two_ranks(_run_all, size, steps, warmup, seq)


def measured_table(results: dict[str, dict[str, Any]]) -> str:
    base = results["adamw"]
    lines = ["| method | state, rank 0 (MiB) | × AdamW | step (s) | × AdamW | refresh step (s) | "
             "optimizer MiB per step | optimizer MiB at a refresh |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {method} | {r['state'] / MiB:,.1f} | {r['state'] / base['state']:.3f} | {r['time']:.3f} | "
              f"{r['time'] / base['time']:.2f} | {r['refresh_time']:.3f} | {r['bytes'] / MiB:,.2f} | "
              f"{r['refresh_bytes'] / MiB:,.1f} |" for method, r in results.items()]
    return "\n".join(lines)


# ------------------------------------------------------------------ on paper
def paper_traffic(size: str, gap: int = 200) -> dict[str, Any]:
    """Bytes (fp32) per step and rank, amortized over ``gap`` steps: FSDP's own (weights gathered
    twice, gradients reduce-scattered: 3·|W|) and what GaLore's sharded step adds."""
    from transformers import LlamaForCausalLM

    rank = GALORE_RANKS[size]
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(size))
    targets, _ = select_targets(model)
    fsdp = 3 * sum(p.numel() for p in model.parameters()) * 4
    refresh = sum(p.numel() for p in targets.values()) * 4 / gap
    left = sum(2 * rank * p.shape[1] for p in targets.values() if choose_side("std", p.shape) == Side.LEFT) * 4
    return {"size": size, "rank": rank, "fsdp": fsdp, "refresh": refresh, "left": left}


def paper_table(results: list[dict[str, Any]]) -> str:
    lines = ["| model | rank | FSDP MiB per step | + refresh all-gather (÷ T=200) | + left R and N | added × FSDP |",
             "|---|---|---|---|---|---|"]
    lines += [f"| LLaMA-{r['size']} | {r['rank']} | {r['fsdp'] / MiB:,.0f} | {r['refresh'] / MiB:,.1f} | "
              f"{r['left'] / MiB:,.1f} | {(r['refresh'] + r['left']) / r['fsdp']:.4f} |" for r in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__).parse_args(argv)
    if not args.no_measure:
        print(f"Measured: LLaMA-{args.size} (vocabulary 1,024), FSDP2 over 2 gloo processes, rank "
              f"{GALORE_RANKS[args.size]} (APOLLO-Mini 1), {args.seq} tokens per rank per step, median of "
              f"{args.steps} steps\n")
        print(measured_table(measure(args.size, args.steps, args.warmup, args.seq)))
        print()
    print("On paper (fp32, GaLore's ranks, T = 200):\n")
    print(paper_table([paper_traffic(size) for size in args.paper]))


if __name__ == "__main__":
    main()
