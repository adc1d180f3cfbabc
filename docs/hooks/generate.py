"""MkDocs hook: the pages that are generated, not written.

- ``methods.md``: the marker ``<!-- generated: methods -->`` becomes the methods reference, read
  from the registry (``lit_lowrank.registered("methods")``: name, paper, description, what it sets,
  the components' own options), the state formulas below, and the measured step/state ratios and
  convergence rows from ``bench/``.
- ``benchmarks.md``: each marker ``<!-- generated: bench NAME -->`` becomes the table of the CSV
  named in :data:`BENCHMARKS`, with its command, commit, date, hardware and torch version.

``python docs/hooks/generate.py`` prints the methods reference (what the tests read too).
"""

from __future__ import annotations

import csv
import inspect
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).parents[2]
METHODS_MARKER = "<!-- generated: methods -->"
BENCH_MARKER = "<!-- generated: bench {name} -->"

CPU = "2-core x86-64 CPU (shared machine)"
TORCH = "2.13.0+cpu"

FORMULAS = {
    "galore": "2·k·b + r·d·b",
    "galore-rsvd": "2·k·b + r·d·b",
    "galore-warm": "2·k·b + r·d·b",
    "galore-dct": "2·k·b + 8·r + r·d·b (cached columns; 2·k·b + 8·r with `cache_basis: false`)",
    "online-pca": "2·k·b + r·d·b",
    "galore-random": "2·k·b + 16 + r·d·b (cached; 2·k·b + 16 with `cache_basis: false`)",
    "adaptive-rank": "2·r_l·max(m,n)·b + r_l·d·b (r_l: the layer's rank)",
    "fira": "2·k·b + r·d·b",
    "apollo": "2·k·b + 16 + r·d·b (cached projection; 2·k·b + 16 with `cache_basis: false`)",
    "apollo-mini": "2·max(m,n)·b + 16 + d·b",
    "snsm": "k·b + 4·max(m,n) + r·d·b",
    "galore-sn": "k·b + 4·max(m,n) + r·d·b",
    "galore-adafactor": "4·(r + max(m,n)) (+ 4·k with `beta1`) + r·d·b",
    "galore-lion": "k·b + r·d·b",
    "galore-8bit": "2·(k + 4⌈k/256⌉ + 16) + r·d·b if k ≥ 4096, else 2·k·b + r·d·b",
    "q-galore": "moments as galore-8bit + basis ⌈d·r⌉₂₅₆/2 + 8·⌈d·r/256⌉ + 16; "
                "weight ⌈m·n⌉₂₅₆ + 8·⌈m·n/256⌉ + 16 instead of m·n·b",
    "gradnorm": "galore's + 2·m·b for g",
    "gradnorm-8bit": "galore-8bit's + 2·m·b for g",
    "compact": "2·r·m·b + 16 + r·n·b (m = out, n = in); activations tokens·r per layer instead of tokens·n",
}
"""Optimizer state per m×n target weight (side ``std``, rank r, b bytes per element,
k = r·max(m, n), d = min(m, n), ⌈x⌉₂₅₆ = x rounded up to whole groups of 256), as
``tests/optim/test_state_formulas.py`` checks them against ``optimizer.state_bytes()``."""

OFFERED = {"projectors": {"rank", "side", "seed", "ledger"}, "update_rules": {"scale"},
           "inner_optimizers": {"betas", "eps", "lr", "weight_decay"}, "schedules": {"gap"}}
"""Keywords the optimizer hands a component itself: not the component's own settings."""

COMPONENT_OF = {"projector": "projectors", "rule": "update_rules", "inner": "inner_optimizers",
                "schedule": "schedules"}
DEFAULT_COMPONENTS = {"projector": "svd", "rule": "galore", "inner": "adamw", "schedule": "fixed"}


@dataclass(frozen=True)
class Benchmark:
    """A CSV under ``bench/`` and how it was measured."""

    path: str
    command: str
    setup: str
    hardware: str = CPU
    torch: str = TORCH
    commit: str = ""
    date: str = ""


BENCHMARKS = {
    "convergence": Benchmark(
        "bench/convergence/results.csv", "python scripts/bench_convergence.py",
        "the demo run (tiny LLaMA, 300 steps of 16 × 128 tokens of Shakespeare, seed 0 unless a row names "
        "another), best lr per method by final validation loss; one thread per run, two runs in parallel"),
    "scaling": Benchmark(
        "bench/scaling/scaling.csv", "python scripts/bench_scaling.py",
        "optimizer step (median of 5 steady-state steps, no refresh) and measured state, LLaMA shapes, "
        "the same fixed gradients for every optimizer, 2 threads"),
    "optim": Benchmark(
        "bench/optim/llama60m.csv", "python scripts/bench_optim.py",
        "LLaMA-60M shape (58.1 M parameters), rank 128, T = 200, α 0.25, fp32, 2 threads, the same fixed "
        "gradients for every method, median of 10 steady-state steps after 3"),
}


def read_csv(path: str) -> list[dict[str, str]]:
    """The rows of a CSV under the repository root."""
    with open(ROOT / path, newline="") as handle:
        return list(csv.DictReader(handle))


def last_commit(path: str) -> tuple[str, str]:
    """(short hash, date) of the commit that last changed ``path``; empty outside a git checkout."""
    result = subprocess.run(["git", "log", "-1", "--format=%h %cs", "--", path], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    parts = result.stdout.split()
    return (parts[0], parts[1]) if len(parts) == 2 else ("", "")


def provenance(bench: Benchmark) -> str:
    """One line: command, commit, date, hardware, torch version."""
    commit, date = (bench.commit, bench.date) if bench.commit else last_commit(bench.path)
    return (f"`{bench.command}` — {bench.setup}. Measured on a {bench.hardware}, torch {bench.torch}; "
            f"`{bench.path}` at commit `{commit or 'uncommitted'}` ({date or 'not yet committed'}).")


def seed_of(row: dict[str, str]) -> str:
    """A convergence row's seed (rows from before the seed column: the demo's seed 0)."""
    return row.get("seed") or "0"


def best_convergence_rows(seed: str = "0") -> dict[str, dict[str, str]]:
    """Per variant, the row of the lr with the lowest validation perplexity among its runs with
    ``seed`` (default: the demo's 0, which every variant was run with)."""
    best: dict[str, dict[str, str]] = {}
    for row in read_csv(BENCHMARKS["convergence"].path):
        if seed_of(row) != seed or not row["val_ppl"]:
            continue
        if row["variant"] not in best or float(row["val_ppl"]) < float(best[row["variant"]]["val_ppl"]):
            best[row["variant"]] = row
    return best


def convergence_seeds() -> dict[str, list[str]]:
    """The seeds each variant was run with, ascending."""
    seeds: dict[str, set[str]] = {}
    for row in read_csv(BENCHMARKS["convergence"].path):
        seeds.setdefault(row["variant"], set()).add(seed_of(row))
    return {variant: sorted(found, key=int) for variant, found in seeds.items()}


def swept_lrs(variant: str) -> list[str]:
    """The learning rates a variant was run at, ascending."""
    rates = {row["lr"] for row in read_csv(BENCHMARKS["convergence"].path) if row["variant"] == variant}
    return sorted(rates, key=float)


def convergence_table() -> str:
    """Best lr per variant (and per seed, where a variant was run with several): perplexity and
    state against AdamW and AdamW-split; then the seed-to-seed spread (:func:`seed_spread_table`)."""
    best = best_convergence_rows()
    adamw, split = float(best["adamw"]["val_ppl"]), float(best["adamw-split"]["val_ppl"])
    adamw_state = float(best["adamw"]["state_bytes"])
    by_seed = {seed: best_convergence_rows(seed) for seeds in convergence_seeds().values() for seed in seeds}
    lines = ["| method | lr (of swept) | val ppl | × AdamW | × AdamW-split | state MB | × AdamW | wall s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for variant, seeds in convergence_seeds().items():
        for seed in seeds:
            row = by_seed[seed][variant]
            name = variant if len(seeds) == 1 else f"{variant} (seed {seed})"
            ppl, state = float(row["val_ppl"]), float(row["state_bytes"])
            lines.append(f"| {name} | {row['lr']} (of {', '.join(swept_lrs(variant))}) | {ppl:.1f} | {ppl / adamw:.3f} | "
                         f"{ppl / split:.3f} | {state / 1e6:.2f} | {state / adamw_state:.3f} | {float(row['wall_s']):.0f} |")
    spread = seed_spread_table()
    return "\n".join(lines) + (f"\n\n{spread}" if spread else "")


def seed_spread_table(reference: str = "galore") -> str:
    """Per variant and lr run with several seeds: each seed's final validation loss, their mean,
    their spread (max − min: the run-to-run noise) and the mean's difference from ``reference``'s
    mean. Empty if no configuration was run with two seeds."""
    losses: dict[tuple[str, str], dict[str, float]] = {}
    for row in read_csv(BENCHMARKS["convergence"].path):
        losses.setdefault((row["variant"], row["lr"]), {})[seed_of(row)] = float(row["val_loss"])
    several = {key: found for key, found in losses.items() if len(found) > 1}
    means = {key: sum(found.values()) / len(found) for key, found in several.items()}
    baseline = [mean for (variant, _), mean in means.items() if variant == reference]
    lines = [f"| method | lr | val loss by seed | mean | max − min | mean − {reference}'s mean |",
             "|---|---:|---|---:|---:|---:|"]
    for (variant, lr), found in several.items():
        by_seed = ", ".join(f"{seed}: {loss:.4f}" for seed, loss in sorted(found.items(), key=lambda item: int(item[0])))
        difference = f"{means[variant, lr] - baseline[0]:+.4f}" if len(baseline) == 1 else "—"
        lines.append(f"| {variant} | {lr} | {by_seed} | {means[variant, lr]:.4f} | "
                     f"{max(found.values()) - min(found.values()):.4f} | {difference} |")
    return "\n".join(lines) if several else ""


def scaling_table() -> str:
    """Step time and state per size/rank, ratios against AdamW of the same size and rank."""
    rows = read_csv(BENCHMARKS["scaling"].path)
    adamw = {(row["sweep"], row["size"], row["rank"]): row for row in rows if row["optimizer"] == "adamw"}
    lines = ["| sweep | size | params | rank | optimizer | step ms | × adamw | state MiB | × adamw | low-rank GFLOP/s (% of peak) |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        base = adamw[(row["sweep"], row["size"], row["rank"])]
        flops = float(row["lowrank_gflops"])
        peak = float(row["matmul_peak_gflops"])
        flops_cell = f"{flops:.1f} ({flops / peak:.0%} of {peak:.0f})" if flops else "—"
        lines.append(f"| {row['sweep']} | {row['size']} | {int(row['params']) / 1e6:.1f} M | {row['rank']} | {row['optimizer']} | "
                     f"{float(row['step_ms']):.1f} | {float(row['step_ms']) / float(base['step_ms']):.2f} | "
                     f"{float(row['state_mib']):.1f} | {float(row['state_mib']) / float(base['state_mib']):.3f} | {flops_cell} |")
    return "\n".join(lines)


def optim_table() -> str:
    """The optimizer-step benchmark as measured."""
    lines = ["| method | step ms | × adamw | first-step extra ms (refresh) | state MiB | × adamw |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in read_csv(BENCHMARKS["optim"].path):
        lines.append(f"| {row['method']} | {row['step_ms']} | {row['step_x_adamw']} | {row['refresh_extra_ms']} | "
                     f"{row['state_mib']} | {row['state_x_adamw']} |")
    return "\n".join(lines)


TABLES = {"convergence": convergence_table, "scaling": scaling_table, "optim": optim_table}


def render_benchmarks(markdown: str) -> str:
    """Each bench marker replaced by its provenance line and table."""
    for name, bench in BENCHMARKS.items():
        markdown = markdown.replace(BENCH_MARKER.format(name=name), f"{provenance(bench)}\n\n{TABLES[name]()}\n")
    return markdown


def own_options(kind: str, cls: type) -> list[str]:
    """A component's own keyword options with their defaults, e.g. ``oversample=8``."""
    from lit_lowrank.optim.validation import accepted

    defaults: dict[str, object] = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass) and klass is not object:
            for parameter in inspect.signature(klass.__init__).parameters.values():
                if parameter.default is not inspect.Parameter.empty:
                    defaults[parameter.name] = parameter.default
    names = [name for name in accepted(cls) if name not in OFFERED.get(kind, set())]
    return [f"{name}={defaults[name]!r}" if name in defaults else name for name in names]


def components(settings: dict) -> list[str]:
    """One line per component the method uses: its name, class and own options."""
    from lit_lowrank import plugins

    lines = []
    for option, kind in COMPONENT_OF.items():
        name = settings.get(option, DEFAULT_COMPONENTS[option])
        cls = plugins.get(kind, name)
        options = ", ".join(f"`{item}`" for item in own_options(kind, cls)) or "none"
        lines.append(f"- {option} `{name}` (`{cls.__module__}.{cls.__qualname__}`); its options (`{option}_args`): {options}")
    return lines


def measured(name: str) -> list[str]:
    """The method's rows in the optimizer-step and convergence benchmarks, where it has them."""
    step = {row["method"]: row for row in read_csv(BENCHMARKS["optim"].path)}.get(name)
    best = best_convergence_rows()
    lines = []
    if step:
        lines.append(f"- optimizer step {step['step_x_adamw']}× AdamW's, state {step['state_x_adamw']}× "
                     f"([optimizer step benchmark](benchmarks.md#optimizer-step-and-state), LLaMA-60M shape)")
    if name in best:
        row, adamw = best[name], float(best["adamw"]["val_ppl"])
        lines.append(f"- convergence: validation perplexity {float(row['val_ppl']):.1f} at lr {row['lr']} "
                     f"({float(row['val_ppl']) / adamw:.3f}× AdamW's; [convergence benchmark](benchmarks.md#convergence))")
    return lines or ["- not in the committed benchmark tables"]


def method_section(name: str, entry) -> str:
    """The reference entry of one registered method."""
    method = entry.component
    settings = json.loads(json.dumps(method.settings()))
    spelled = ", ".join(f"{key}: {json.dumps(value)}" for key, value in settings.items()) or "the defaults"
    lines = [f"### {name}", "", method.description, ""]
    if method.paper:
        lines += [f"**Paper:** {method.paper}", ""]
    lines += [f"**Sets** (`lowrank: {{method: {name}}}`): `{spelled}`", "",
              f"**Provided by:** `{entry.provider}`", "",
              f"**Optimizer state per target:** {FORMULAS.get(name, 'see the plugin’s documentation')}", "",
              *components(settings), *measured(name), ""]
    return "\n".join(lines)


def methods_summary(methods: dict) -> str:
    """One row per method: name, paper, what it sets, step and state ratios, perplexity ratio."""
    step = {row["method"]: row for row in read_csv(BENCHMARKS["optim"].path)}
    best = best_convergence_rows()
    adamw = float(best["adamw"]["val_ppl"])
    lines = ["| method | paper | sets | step × AdamW | state × AdamW | val ppl × AdamW |", "|---|---|---|---:|---:|---:|"]
    for name, entry in methods.items():
        settings = json.loads(json.dumps(entry.component.settings()))
        spelled = ", ".join(f"`{key}: {json.dumps(value)}`" for key, value in settings.items()) or "(defaults)"
        row = step.get(name, {})
        ppl = f"{float(best[name]['val_ppl']) / adamw:.3f}" if name in best else "—"
        lines.append(f"| [{name}](#{name}) | {entry.component.paper or '—'} | {spelled} | "
                     f"{row.get('step_x_adamw', '—')} | {row.get('state_x_adamw', '—')} | {ppl} |")
    return "\n".join(lines)


def methods_reference() -> str:
    """The methods reference: a summary table, then one section per registered method."""
    from lit_lowrank import registered

    methods = registered("methods")
    return "\n\n".join([methods_summary(methods), "## Every method", *(method_section(n, e) for n, e in methods.items())])


def on_page_markdown(markdown: str, page, config, files) -> str:
    """MkDocs hook: fill in the generated parts of a page."""
    if METHODS_MARKER in markdown:
        markdown = markdown.replace(METHODS_MARKER, methods_reference())
    return render_benchmarks(markdown)


def on_files(files, config):
    """MkDocs hook: publish the benchmark figures under ``bench/`` at the same paths in the site."""
    from mkdocs.structure.files import File

    for image in sorted(ROOT.glob("bench/**/*.png")):
        files.append(File.generated(config, image.relative_to(ROOT).as_posix(), abs_src_path=str(image)))
    return files


SPHINX_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|obj|exc):<code>(~?)([^<]*)</code>")
"""A Sphinx cross-reference role left in a rendered docstring (``:class:`~a.B``` → ``B``)."""


def on_page_content(html: str, page, config, files) -> str:
    """MkDocs hook: the docstrings' Sphinx roles rendered as plain code (``~`` keeps the last name)."""
    return SPHINX_ROLE.sub(lambda m: f"<code>{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}</code>", html)


if __name__ == "__main__":
    print(methods_reference())
