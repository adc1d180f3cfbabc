"""``scripts/gpu_check.sh`` cannot run here (no GPU), so check what can be: it parses, every script
it calls exists, and every option it passes is one that script accepts; the 7B probe refuses a
machine without CUDA with a clear message."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[2]
CHECK = ROOT / "scripts" / "gpu_check.sh"


def script_calls() -> list[list[str]]:
    """The ``python scripts/<x>.py ...`` command lines of gpu_check.sh (continuations joined)."""
    text = CHECK.read_text().replace("\\\n", " ")
    return [shlex.split(line.strip())[1:] for line in text.splitlines() if line.strip().startswith("python scripts/")]


def test_it_parses():
    assert subprocess.run(["bash", "-n", str(CHECK)]).returncode == 0


@pytest.mark.parametrize("call", script_calls(), ids=lambda call: " ".join(call[:2]))
def test_every_option_it_passes_is_accepted(call):
    script, options = ROOT / call[0], [arg for arg in call[1:] if arg.startswith("--")]
    assert script.exists(), script
    help_text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                               cwd=ROOT, timeout=120).stdout
    accepted = set(re.findall(r"--[\w-]+", help_text))
    assert set(options) <= accepted, (call[0], sorted(set(options) - accepted))


def test_the_7b_probe_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "measure_7b_peak.py")], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "needs a CUDA device" in result.stderr
