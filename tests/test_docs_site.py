"""The documentation site: it builds in strict mode, every ``python`` block of README.md and docs/
runs (or says by an HTML comment what it needs), the README's method table is the registry's and
the benchmarks', and every path a README or docs command names exists."""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lit_lowrank import plugins
from lit_lowrank.methods import BUILTIN_METHODS

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
NEEDS = {"gpu": "a CUDA device", "hub": "the Hugging Face hub (network)",
         "multi-node": "several machines", "torchrun": "processes started by torchrun",
         "accelerate": "HF accelerate (for transformers' Trainer; in no extra)"}
"""What a block may declare with ``<!-- needs: ... -->`` on the line before it."""

FENCE = re.compile(r"(?:<!-- needs: ([\w-]+) -->\n)?^( *)```(\w+)\n(.*?)^\2```", re.MULTILINE | re.DOTALL)


def blocks(language: str) -> list[tuple[str, int, str | None, str]]:
    """(page, index on the page, declared need, dedented code) of every ``language`` block."""
    found = []
    for page in PAGES:
        matches = [m for m in FENCE.finditer(page.read_text()) if m.group(3) == language]
        for index, match in enumerate(matches):
            indent = len(match.group(2))
            code = "\n".join(line[indent:] for line in match.group(4).splitlines())
            found.append((str(page.relative_to(ROOT)), index, match.group(1), code))
    return found


PYTHON_BLOCKS = blocks("python")


def block_id(block: tuple) -> str:
    return f"{block[0]}:{block[1]}"


def generator():
    """The site's hook module, docs/hooks/generate.py (loaded from its path)."""
    spec = importlib.util.spec_from_file_location("docs_hooks_generate", ROOT / "docs" / "hooks" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          cwd=config.parent, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_site_builds_in_strict_mode(tmp_path):
    result = mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stderr[-3000:]
    methods = (tmp_path / "site" / "methods" / "index.html").read_text()
    assert all(f'id="{name}"' in methods for name in BUILTIN_METHODS)
    api = (tmp_path / "site" / "api" / "optimizer" / "index.html").read_text()
    assert 'id="lit_lowrank.build_optimizer"' in api and 'id="lit_lowrank.LowRankOptimizer"' in api


@pytest.mark.slow
def test_a_broken_link_fails_the_build(tmp_path):
    """Strict mode is on: a copy of the site with one link to a missing page does not build."""
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path)
    shutil.copy(ROOT / "CHANGELOG.md", tmp_path)
    (tmp_path / "bench").symlink_to(ROOT / "bench")
    with open(tmp_path / "docs" / "index.md", "a") as page:
        page.write("\nSee [the missing page](missing.md).\n")
    result = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0 and "missing.md" in result.stderr


def test_every_python_block_is_found_and_declares_only_known_needs():
    assert len(PYTHON_BLOCKS) >= 10
    unknown = [(block_id(block), block[2]) for block in PYTHON_BLOCKS if block[2] and block[2] not in NEEDS]
    assert not unknown, f"use one of {sorted(NEEDS)}: {unknown}"


@pytest.mark.parametrize("block", [pytest.param(block, id=block_id(block), marks=[pytest.mark.slow] if "Trainer" in block[3] else [])
                                   for block in PYTHON_BLOCKS])
def test_python_block_runs(block, tmp_path, monkeypatch):
    page, index, need, code = block
    if need:
        pytest.skip(f"needs {NEEDS[need]}")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{page}:block{index}", "exec"), {"__name__": f"docs_block_{index}"})


def readme_method_table() -> list[list[str]]:
    """The README's method table, below its header, as cells."""
    text = (ROOT / "README.md").read_text()
    lines = text[text.index("| method | paper | step × AdamW"):].splitlines()
    table = lines[: next(i for i, line in enumerate(lines) if not line.startswith("|"))]
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in table[2:]]


def test_readme_method_table_is_the_registry_and_the_benchmarks():
    hooks = generator()
    step = {row["method"]: row for row in hooks.read_csv(hooks.BENCHMARKS["optim"].path)}
    best = hooks.best_convergence_rows()
    rows = readme_method_table()
    assert len(rows) >= 5
    for name_cell, paper, step_ratio, state_ratio, ppl_ratio in rows:
        name = name_cell.strip("`")
        method = plugins.get_method(name)
        assert method.paper.startswith(paper), (name, paper, method.paper)
        measured = step.get(name, {"step_x_adamw": "—", "state_x_adamw": "—"})
        expected_ppl = f"{float(best[name]['val_ppl']) / float(best['adamw']['val_ppl']):.3f}" if name in best else "—"
        assert (step_ratio, state_ratio, ppl_ratio) == (measured["step_x_adamw"], measured["state_x_adamw"],
                                                        expected_ppl), name


def test_readme_names_every_builtin_method():
    text = (ROOT / "README.md").read_text()
    missing = [name for name in BUILTIN_METHODS if f"`{name}`" not in text]
    assert not missing, missing


def test_every_builtin_method_has_a_state_formula():
    assert set(BUILTIN_METHODS) <= set(generator().FORMULAS), sorted(set(BUILTIN_METHODS) - set(generator().FORMULAS))


def test_choosing_memory_rows_are_rows_of_the_estimator_table():
    """docs/choosing.md quotes rows of docs/quantized.md's 7B table, which
    tests/scripts/test_estimate_memory.py checks against the estimator."""
    def figures(page: str, start: str) -> list[tuple[str, ...]]:
        text = (ROOT / "docs" / page).read_text()
        lines = text[text.index(start):].splitlines()
        table = lines[: next(i for i, line in enumerate(lines) if not line.startswith("|"))]
        return [tuple(cell.strip() for cell in line.split("|")[1:-1][-4:]) for line in table[2:]]

    estimated = set(figures("quantized.md", "| method | weights | gradients"))
    quoted = figures("choosing.md", "| what you need to fit |")
    assert len(quoted) >= 5 and set(quoted) <= estimated, set(quoted) - estimated


def command_paths(page: Path) -> list[str]:
    """Repository paths named by the bash commands of a page: ``--config`` values and every word
    under configs/, scripts/, plugins/, tests/, docs/ or bench/."""
    paths = []
    for match in FENCE.finditer(page.read_text()):
        if match.group(3) != "bash":
            continue
        for line in match.group(4).replace("\\\n", " ").splitlines():
            words = shlex.split(line.split(" #")[0], posix=True) if line.strip() and not line.lstrip().startswith("#") else []
            paths += [word for word in words if re.match(r"(configs|scripts|plugins|tests|docs|bench)/", word)]
    return [path for path in paths if "$" not in path and "<" not in path]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_bash_commands_name_real_files(page):
    named = command_paths(page)
    missing = [path for path in named if not (ROOT / path).exists()]
    assert not missing, missing


def test_readme_quick_starts_name_real_files():
    named = command_paths(ROOT / "README.md")
    assert {"scripts/install.sh", "configs/demo.yaml"} <= set(named)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_cited_repository_files_exist(page):
    """Inline code naming a file of the repository (`tests/...py`, `scripts/...`, ...) names one that exists."""
    cited = re.findall(r"`((?:tests|scripts|lit_lowrank|configs|bench|plugins|docs)/[^`:\s*<{]+)(?:::[^`]*)?`", page.read_text())
    missing = sorted({path for path in cited if not (ROOT / path).exists()})
    assert not missing, missing
