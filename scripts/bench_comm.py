"""Gradient traffic and step time: plain DDP against low-rank communication, measured on 2 gloo
processes, and on paper for the papers' LLaMA sizes and ranks.

    python scripts/bench_comm.py                          # measured on LLaMA-60M; on paper: 60M, 1B, 7B
    python scripts/bench_comm.py --size tiny --steps 3 --paper 1b

Measured: each of 2 CPU processes (gloo over loopback, one thread each) trains the same LLaMA on
its own sequences, in three modes from the same initial weights and data: ``ddp`` (DDP's own
all-reduce, its bytes counted by a hook that wraps it), ``ddp + lowrank`` (DDP with
:func:`lit_lowrank.lowrank_comm_hook`) and ``layer-wise + lowrank`` (no DDP: the layer-wise hooks
all-reduce inside backward). GaLore at the size's rank with T = 1000, so only the first step
refreshes: bytes and times are of the steady-state steps (median over ``--steps`` after
``--warmup``), one step = forward, backward (with its communication) and optimizer step. The last
column is the weights' relative distance from ``ddp``'s after the run, ‖W − W_ddp‖ / ‖W_ddp‖ over
all weights (the same training, up to float rounding that Adam's normalization amplifies where
a gradient entry is near zero). The measured model has a 1,024-token vocabulary (the on-paper
one 32,000), so its embedding and head weigh less than at the papers' setting. Gloo on one CPU is not NCCL between GPUs: the byte ratio carries over, the time
ratio says only that less traffic also costs less here.

On paper: per target-weight shape, ``r/min(m, n)`` — the fraction of its gradient that a rank sends
between refreshes — and for the whole model the bytes of a non-refresh step, of a refresh step,
and their average over T = 200 steps (one refresh), against DDP's full gradient every step.
"""

import statistics
import time
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from lit_lowrank import LowRankCommunication, build_optimizer, lowrank_comm_hook, select_targets
from lit_lowrank.models.llama import GALORE_RANKS, llama_config
from lit_lowrank.optim.layerwise import LayerwiseUpdates
from two_ranks import measure_on_two_ranks, parser

MODES = ("ddp", "ddp + lowrank", "layer-wise + lowrank")
MiB = 2**20


# ------------------------------------------------------------------ on paper
def paper_traffic(size: str, rank: int | None = None, gap: int = 200) -> dict[str, Any]:
    """Gradient bytes (fp32) one rank all-reduces per step for LLaMA-``size`` at ``rank``
    (the papers' by default): per target shape and for the whole model."""
    from transformers import LlamaForCausalLM

    rank = rank or GALORE_RANKS[size]
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(size))
    targets, _ = select_targets(model)
    shapes = Counter(tuple(p.shape) for p in targets.values())
    total = sum(p.numel() for p in model.parameters()) * 4
    target_full = sum(p.numel() for p in targets.values()) * 4
    target_low = sum(min(rank, *p.shape) * max(p.shape) for p in targets.values()) * 4
    steady = total - target_full + target_low
    return {
        "size": size, "rank": rank,
        "shapes": [{"shape": shape, "count": count, "ratio": min(rank, *shape) / min(shape)}
                   for shape, count in shapes.items()],
        "full_bytes": total, "target_share": target_full / total, "steady_bytes": steady,
        "amortized_bytes": ((gap - 1) * steady + total) / gap, "gap": gap,
    }


def paper_table(results: list[dict[str, Any]]) -> str:
    lines = ["| size | rank | target shape (count): r/min(m, n) | targets' share of DDP traffic | DDP MiB/step | "
             "low-rank MiB/step (no refresh) | mean over T=200 | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        shapes = "; ".join(f"{m}×{n} ({c}): {ratio:.3f}" for (m, n), c, ratio in
                           ((s["shape"], s["count"], s["ratio"]) for s in r["shapes"]))
        lines.append(f"| {r['size']} | {r['rank']} | {shapes} | {r['target_share']:.1%} | "
                     f"{r['full_bytes'] / MiB:,.0f} | {r['steady_bytes'] / MiB:,.0f} | "
                     f"{r['amortized_bytes'] / MiB:,.0f} | {r['amortized_bytes'] / r['full_bytes']:.3f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ measured
def _counting_allreduce(state: dict[str, int], bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's own all-reduce, counting its bytes (no ``from __future__ import annotations`` in this
    file: DDP checks a hook's annotations as objects)."""
    state["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
    return allreduce_hook(None, bucket)


def _run_mode(mode: str, size: str, tokens: list[torch.Tensor], warmup: int) -> dict[str, Any]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(size, vocab_size=1024))
    optimizer = build_optimizer(model, rank=GALORE_RANKS[size], update_gap=1000, scale=0.25, lr=1e-3)
    counted = {"bytes": 0}
    if mode == "ddp":
        forward = DistributedDataParallel(model)
        forward.register_comm_hook(counted, _counting_allreduce)
    elif mode == "ddp + lowrank":
        forward = DistributedDataParallel(model)
        forward.register_comm_hook(LowRankCommunication(optimizer), lowrank_comm_hook)
    else:
        forward = model
        LayerwiseUpdates(optimizer, communication="lowrank").attach()
    times, sent = [], []
    for step, batch in enumerate(tokens):
        counted["bytes"] = 0
        start = time.perf_counter()
        forward(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= warmup:
            times.append(time.perf_counter() - start)
            sent.append(counted["bytes"] if mode == "ddp" else optimizer.comm_bytes)
    return {"time": statistics.median(times), "bytes": statistics.median(sent),
            "weights": [p.detach().clone() for p in model.parameters()]}


def _run_all(size: str, tokens: list[torch.Tensor], warmup: int) -> dict[str, dict[str, Any]]:
    return {mode: _run_mode(mode, size, tokens, warmup) for mode in MODES}


def measure(size: str = "60m", steps: int = 5, warmup: int = 2, seq: int = 128) -> list[dict[str, Any]]:
    """Per mode: bytes rank 0 all-reduced and its step time (steady-state medians), and the
    weights' relative distance from ``ddp``'s after the run."""
    results = measure_on_two_ranks(_run_all, size, steps, warmup, seq)
    base = results["ddp"]
    return [{"mode": mode, "bytes": r["bytes"], "bytes_ratio": r["bytes"] / base["bytes"], "time": r["time"],
             "time_ratio": r["time"] / base["time"], "weight_distance": relative_distance(r["weights"], base["weights"])}
            for mode, r in results.items()]


def relative_distance(weights: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """‖W − W_ref‖ / ‖W_ref‖ over all the tensors together (Frobenius)."""
    difference = sum(((a - b).double() ** 2).sum() for a, b in zip(weights, reference))
    return (difference / sum((b.double() ** 2).sum() for b in reference)).sqrt().item()


def measured_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| mode | MiB sent per step (rank 0) | × DDP | step time (s) | × DDP | ‖W − W_ddp‖ / ‖W_ddp‖ |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['bytes'] / MiB:,.2f} | {r['bytes_ratio']:.3f} | {r['time']:.3f} | "
              f"{r['time_ratio']:.2f} | {r['weight_distance']:.1e} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__).parse_args(argv)
    if not args.no_measure:
        print(f"Measured: LLaMA-{args.size} (vocabulary 1,024), 2 gloo processes, rank {GALORE_RANKS[args.size]}, "
              f"{args.seq} tokens per rank per step, median of {args.steps} steps\n")
        print(measured_table(measure(args.size, args.steps, args.warmup, args.seq)))
        print()
    print("On paper (fp32 gradients, GaLore's ranks):\n")
    print(paper_table([paper_traffic(size) for size in args.paper]))


if __name__ == "__main__":
    main()
