"""Optimizer step time and state memory on a real LLaMA shape, against torch AdamW in the same run.

    python scripts/bench_optim.py                      # LLaMA-60M, the baselines and every registered method
    python scripts/bench_optim.py --size 130m --methods adamw galore fira
    python scripts/bench_optim.py --device cuda --dtype bf16
    python scripts/bench_optim.py --model mixtral --methods adamw galore fira   # stacked MoE experts
    python scripts/bench_optim.py --model cnn --methods adamw galore galore-tucker   # conv kernels
    python scripts/bench_optim.py --cycle                  # a full refresh cycle: spikes, amortized cost
    python scripts/bench_optim.py --cycle --size 20m --gap 50 --projectors svd rsvd
    python scripts/bench_optim.py --interleave --methods galore-torch galore galore-unguarded --steps 15

``--model mixtral`` is transformers' ``MixtralForCausalLM`` at the size's shape with 4 fused
experts per layer (the experts are E×m×n parameters, projected per expert in one batched step);
``--model cnn`` a stack of 3×3 convolutions (:class:`ConvNet`) whose kernels are the targets
(matricized out × in·9 by ``galore``, per mode by ``galore-tucker``). A method that cannot take a
model's targets is reported as refused, with the optimizer's reason.

Methods are the baselines below and every registered method (``python -m lit_lowrank plugins``),
built with ``build_optimizer(model, method=name)`` at GaLore's 60M settings (rank 128, T = 200,
α = 0.25 unless the method sets them, lr 0.01); a method's model transform (Q-GaLore's INT8
weights, GradNormLoRP's weight normalization) is applied first. Each method gets the same model
and the same fixed gradients; only ``optimizer.step()`` is timed (CUDA events on a GPU). The
first step (which computes the projections) is reported separately as the refresh cost; the
steady-state figure is the median over ``--steps`` steps after ``--warmup`` steps, with
no refresh in between (T = 200). State MiB sums the real storage of every tensor the optimizer
holds (moments, bases, quantization scales), excluding scalar step counters.

``--interleave`` steps every method's optimizer on one model in turn, one step each per round,
so that the load of other work on a shared machine falls on all of them alike (methods without a
model transform only); the ratios of one such run are the comparison to quote. Where the
``galore``, ``galore-torch`` and ``galore-unguarded`` rows are measured, GaLore's step over
galore-torch's and the non-finite guard's share of GaLore's step are printed after the table.

``--cycle`` times instead every step of GaLore's first two refresh cycles (``--gap`` T, default
200) for each of ``--projectors`` (``svd``, ``rsvd`` and ``svd-warm`` where registered), with
and without ``schedule_args: {stagger: true}``. Step 0 refreshes every weight in both modes (a
weight cannot step without a basis) and is left out; steps 1 … T−1 refresh nothing in either
mode (a staggered weight's second refresh comes T + ⌊i·T/N⌋ steps after its first) and give
the steady step (their median); steps T … 2T−1 hold exactly one refresh of every weight — all
at step T, or spread over the cycle with staggering — and give the cycle's median, its worst
step, and the amortized step time, their mean: the steady step plus the cycle's refresh time
over T. The refresh share is (amortized − mean steady step) / mean steady step: two means, so the
machine's occasional slow step weighs on both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

from lit_lowrank import build_optimizer, registered, transforms
from lit_lowrank.memory import measured_state_bytes
from lit_lowrank.methods import Method
from lit_lowrank.models.llama import llama_config

GALORE = dict(rank=128, update_gap=200, scale=0.25, lr=0.01)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

Factory = Callable[[nn.Module], torch.optim.Optimizer]


def galore_torch(model: nn.Module, rank: int = 128, gap: int = 200) -> torch.optim.Optimizer:
    """The peer package's ``GaLoreAdamW`` on the same targets (α 0.25, lr 0.01)."""
    import galore_torch
    from lit_lowrank import select_targets

    targets, dense = select_targets(model)
    return galore_torch.GaLoreAdamW(
        [{"params": list(dense.values())},
         {"params": list(targets.values()), "rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"}],
        lr=0.01, no_deprecation_warning=True,
    )


BASELINES: dict[str, Factory] = {
    "adamw": lambda model: torch.optim.AdamW(model.parameters(), lr=1e-3),
    "adamw-fused": lambda model: torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True),
    "galore-torch": galore_torch,
    "galore-unguarded": lambda model: build_optimizer(model, targets=targets_of(model), **GALORE, nonfinite="ignore"),
    "galore-tucker": lambda model: build_optimizer(model, targets=targets_of(model), projector="tucker", **GALORE),
}
"""Full-rank references, the peer package, GaLore without the non-finite guard (its cost), and
GaLore with the Tucker projector (per-mode bases; for conv kernels)."""


class ConvNet(nn.Sequential):
    """``blocks`` 3×3 convolutions (``conv1``…) of ``channels`` channels with ReLUs, between a
    1×1 ``stem`` and a linear ``head``: the conv-kernel shape of a ResNet stage."""

    def __init__(self, channels: int = 256, blocks: int = 8, classes: int = 1000) -> None:
        layers: dict[str, nn.Module] = {"stem": nn.Conv2d(3, channels, 1)}
        for index in range(1, blocks + 1):
            layers[f"conv{index}"] = nn.Conv2d(channels, channels, 3, padding=1)
            layers[f"relu{index}"] = nn.ReLU()
        super().__init__(OrderedDict(**layers, pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
                                     head=nn.Linear(channels, classes)))


def targets_of(model: nn.Module) -> list[str] | None:
    """The 3×3 kernels of a :class:`ConvNet` (named explicitly: the default targets are linear
    layers), the default targets of the transformers."""
    return ["conv"] if isinstance(model, ConvNet) else None


def method_factory(name: str) -> Factory:
    """``build_optimizer(model, method=name)`` at GaLore's settings, minus those the method sets;
    CompAct's layers are bound to the optimizer."""
    method: Method = registered("methods")[name].component

    def factory(model: nn.Module) -> torch.optim.Optimizer:
        optimizer = build_optimizer(model, method=name, targets=targets_of(model),
                                    **{k: v for k, v in GALORE.items() if k not in method.options})
        transforms.bind(model, method.transforms, optimizer)
        return optimizer

    return factory


def network(kind: str, size: str) -> nn.Module:
    """The benchmarked network: LLaMA of ``size``, Mixtral of its shape with 4 experts, or a ConvNet."""
    from transformers import LlamaForCausalLM

    from lit_lowrank.models import Mixtral

    if kind == "cnn":
        return ConvNet()
    if kind == "mixtral":
        return Mixtral(size, num_experts=4, experts_per_token=2)
    return LlamaForCausalLM(llama_config(size))


def prepared_model(size: str, name: str, dtype: torch.dtype, device: str, kind: str = "llama") -> nn.Module:
    """The network with the method's transform applied and fixed gradients set (CompAct's
    compressed layers get none: their fixed R is handed to the optimizer at each step)."""
    torch.manual_seed(0)
    model = network(kind, size).to(device=device, dtype=dtype)
    method = registered("methods").get(name)
    if method is not None:
        transforms.prepare(model, method.component.transforms, targets_of(model))
    for p in model.parameters():
        p.grad = None if transforms.gradient_hidden(p) else torch.randn_like(p) * 1e-3
    return model


def measure(model: nn.Module, factory: Factory, warmup: int, steps: int) -> dict[str, float]:
    optimizer = factory(model)
    clock = Clock(next(model.parameters()).device)
    step = with_compact_projections(model, optimizer)
    first = clock.time(step)
    for _ in range(warmup):
        step()
    steady = statistics.median(clock.time(step) for _ in range(steps))
    return {"ms": steady * 1e3, "refresh_ms": max(first - steady, 0.0) * 1e3, "mib": measured_state_bytes(optimizer) / 2**20}


CYCLE_PROJECTORS = ("svd", "rsvd", "svd-warm")
"""The projectors ``--cycle`` times by default, those of them registered."""


def measure_interleaved(model: nn.Module, factories: dict[str, Factory], warmup: int, steps: int,
                        ) -> dict[str, dict[str, float]]:
    """:func:`measure` of every factory's optimizer on the one ``model``, their steps taken in
    turn: round k times step k of each."""
    optimizers = {name: factory(model) for name, factory in factories.items()}
    clock = Clock(next(model.parameters()).device)
    firsts = {name: clock.time(optimizer.step) for name, optimizer in optimizers.items()}
    for _ in range(warmup):
        for optimizer in optimizers.values():
            optimizer.step()
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(steps):
        for name, optimizer in optimizers.items():
            times[name].append(clock.time(optimizer.step))
    results = {}
    for name, optimizer in optimizers.items():
        steady = statistics.median(times[name])
        results[name] = {"ms": steady * 1e3, "refresh_ms": max(firsts[name] - steady, 0.0) * 1e3,
                         "mib": measured_state_bytes(optimizer) / 2**20}
    return results


def transformed(name: str) -> bool:
    """Whether a method changes the model before its optimizer is built (INT8 weights, weight
    normalization, CompAct's layers)."""
    method = registered("methods").get(name)
    return method is not None and bool(method.component.transforms)


def cycle_factory(projector: str, stagger: bool, gap: int) -> Factory:
    """GaLore with ``projector`` and refresh gap ``gap``, its weights' refreshes staggered or not."""
    settings = {**GALORE, "update_gap": gap}
    return lambda model: build_optimizer(model, projector=projector, schedule_args={"stagger": stagger}, **settings)


def measure_cycle(model: nn.Module, factory: Factory, gap: int) -> dict[str, float]:
    """Steps 1 … T−1 (no refresh: their median is the steady step, their mean the baseline of the
    refresh share) and T … 2T−1 (one refresh of every weight: the cycle's median, worst and mean,
    the amortized step) after step 0, in ms, and the refreshes the cycle made. The share compares
    two means, so the machine's occasional slow step weighs on both alike."""
    optimizer = factory(model)
    clock = Clock(next(model.parameters()).device)
    clock.time(optimizer.step)  # step 0: every weight's first refresh, staggered or not
    steady = [clock.time(optimizer.step) for _ in range(gap - 1)]
    before = optimizer.refresh_count
    cycle = [clock.time(optimizer.step) for _ in range(gap)]
    return {"steady_ms": statistics.median(steady) * 1e3, "steady_mean_ms": statistics.fmean(steady) * 1e3,
            "median_ms": statistics.median(cycle) * 1e3,
            "worst_ms": max(cycle) * 1e3, "amortized_ms": statistics.fmean(cycle) * 1e3,
            "refreshes": optimizer.refresh_count - before}


def with_compact_projections(model: nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[], object]:
    """``optimizer.step``, preceded for CompAct's layers by handing over a fixed R (out × r), as
    their backward would."""
    compact = [p for p in model.parameters() if transforms.gradient_hidden(p)]
    if not compact:
        return optimizer.step
    rank = optimizer.param_groups[0]["rank"]
    lows = {p: torch.randn(p.shape[0], min(rank, *p.shape), dtype=p.dtype, device=p.device) * 1e-3 for p in compact}

    def step() -> None:
        for p, low in lows.items():
            optimizer.receive(p, low)
        optimizer.step()

    return step


class Clock:
    """Seconds one call takes: CUDA events on a GPU (the step is asynchronous), else wall time."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def time(self, call: Callable[[], object]) -> float:
        if not self.cuda:
            start = time.perf_counter()
            call()
            return time.perf_counter() - start
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        call()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end) / 1e3


def main(argv: list[str] | None = None) -> None:
    methods = [*BASELINES, *registered("methods")]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="60m")
    parser.add_argument("--model", default="llama", choices=["llama", "mixtral", "cnn"])
    parser.add_argument("--methods", nargs="+", default=methods, choices=methods)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="weights, gradients, float states")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cycle", action="store_true", help="time a full refresh cycle of GaLore per projector, "
                        "with and without staggering, instead of the methods")
    parser.add_argument("--interleave", action="store_true", help="step the methods' optimizers in turn on one "
                        "model (methods without a model transform)")
    parser.add_argument("--gap", type=int, default=GALORE["update_gap"], help="--cycle: the refresh gap T (>= 2)")
    parser.add_argument("--projectors", nargs="+", choices=sorted(registered("projectors")),
                        default=[name for name in CYCLE_PROJECTORS if name in registered("projectors")],
                        help="--cycle: the projectors timed")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.gap < 2:
        parser.error(f"--gap must be >= 2 steps (step 1 … T−1 give the steady step), got {args.gap}")

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    n_params = sum(p.numel() for p in prepared_model(args.size, "adamw", DTYPES[args.dtype], "meta",
                                                     args.model).parameters())
    label = {"llama": f"LLaMA-{args.size}", "mixtral": f"Mixtral (LLaMA-{args.size} shape, 4 experts)",
             "cnn": "ConvNet (8 × 3×3 conv, 256 channels)"}[args.model]
    header = f"{label}: {n_params / 1e6:.1f}M params, {args.dtype}, {device}, torch {torch.__version__}; "
    if args.cycle:
        print(header + f"GaLore (rank {GALORE['rank']}), steps 1 … {2 * args.gap - 1} of T = {args.gap}")
        run_cycles(args)
        return
    print(header + f"median of {args.steps} steps after {args.warmup + 1}" + (", interleaved" if args.interleave else ""))
    if args.interleave:
        refused = [name for name in args.methods if transformed(name)]
        if refused:
            parser.error(f"--interleave steps one model: {refused} transform theirs; leave them out")
        model = prepared_model(args.size, "adamw", DTYPES[args.dtype], args.device, args.model)
        factories = {name: BASELINES.get(name) or method_factory(name) for name in args.methods}
        print_table(measure_interleaved(model, factories, args.warmup, args.steps))
        return
    results = {}
    for name in args.methods:
        factory = BASELINES.get(name) or method_factory(name)
        try:
            model = prepared_model(args.size, name, DTYPES[args.dtype], args.device, args.model)
            results[name] = measure(model, factory, args.warmup, args.steps)
        except (ImportError, RuntimeError) as exc:  # a peer not installed; a CUDA-only kernel on CPU
            print(f"  {name}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0]})")
        except ValueError as exc:  # the optimizer refuses the model's targets (e.g. stacked experts)
            print(f"  {name}: refused ({str(exc).splitlines()[0]})")
    print_table(results)


def run_cycles(args: argparse.Namespace) -> None:
    """Print :func:`measure_cycle` of GaLore for each projector, unstaggered then staggered, a
    row as each is measured (a 60M cycle takes minutes)."""
    print("| projector | stagger | steady ms | cycle median ms | worst step ms | worst / median | amortized ms "
          "| refresh share | refreshes in cycle |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for projector in args.projectors:
        for stagger in (False, True):
            model = prepared_model(args.size, "galore", DTYPES[args.dtype], args.device, args.model)
            r = measure_cycle(model, cycle_factory(projector, stagger, args.gap), args.gap)
            share = (r["amortized_ms"] - r["steady_mean_ms"]) / r["steady_mean_ms"]
            print(f"| {projector} | {'yes' if stagger else 'no'} | {r['steady_ms']:.1f} | {r['median_ms']:.1f} "
                  f"| {r['worst_ms']:.1f} | {r['worst_ms'] / r['median_ms']:.2f} | {r['amortized_ms']:.1f} "
                  f"| {100 * share:.1f} % | {r['refreshes']} |", flush=True)


def print_table(results: dict[str, dict[str, float]]) -> None:
    base = results.get("adamw")
    print("| method | step ms | × adamw | first-step extra ms (refresh) | state MiB | × adamw |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        ratio_ms = r["ms"] / base["ms"] if base else float("nan")
        ratio_mib = r["mib"] / base["mib"] if base else float("nan")
        print(f"| {name} | {r['ms']:.1f} | {ratio_ms:.2f} | {r['refresh_ms']:.0f} | {r['mib']:.1f} | {ratio_mib:.3f} |")
    print_fixed_costs(results)


def print_fixed_costs(results: dict[str, dict[str, float]]) -> None:
    """GaLore's step against its peer's, and the non-finite guard's share of it — (galore −
    galore-unguarded) / galore — where those rows were measured (with ``--interleave``, in one run)."""
    galore = results.get("galore")
    if galore is None:
        return
    if "galore-torch" in results:
        print(f"galore / galore-torch: {galore['ms'] / results['galore-torch']['ms']:.2f}×")
    if "galore-unguarded" in results:
        guard = (galore["ms"] - results["galore-unguarded"]["ms"]) / galore["ms"]
        print(f"non-finite guard: {100 * guard:.1f} % of galore's step")


if __name__ == "__main__":
    main()
