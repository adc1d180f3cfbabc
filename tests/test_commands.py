"""``python -m lit_lowrank``'s core commands: ``plugins`` lists every component with what it does,
and runs on a core-only install (no Lightning); ``fit`` there names the extra to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from lit_lowrank import plugins
from lit_lowrank.commands import main

WITHOUT_LIGHTNING = textwrap.dedent("""
    import runpy, sys

    class NotInstalled:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("lightning", "jsonargparse", "torchmetrics"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, NotInstalled())
    sys.argv = ["lit_lowrank", *sys.argv[1:]]
    runpy.run_module("lit_lowrank", run_name="__main__")
""")


def run_without_lightning(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_LIGHTNING, *args], capture_output=True, text=True,
                          timeout=300)


def test_plugins_gives_each_methods_description_and_settings(capsys):
    main(["plugins"])
    lines = capsys.readouterr().out.splitlines()
    for name, entry in plugins.registered("methods").items():
        [line] = [line for line in lines if line.split()[:2] == ["methods", name]]
        assert entry.component.description in line
    [lion] = [line for line in lines if line.split()[:2] == ["methods", "galore-lion"]]
    assert "{inner: lion}" in lion


def test_plugins_gives_each_components_paper_or_summary(capsys):
    main(["plugins"])
    [svd] = [line for line in capsys.readouterr().out.splitlines() if line.split()[:2] == ["projectors", "svd"]]
    assert "GaLore's exact-SVD projector (Zhao et al. 2024, Alg. 2)" in svd and "SVDProjector" in svd


def test_plugins_runs_without_lightning():
    done = run_without_lightning("plugins")
    assert done.returncode == 0, done.stderr
    names = {tuple(line.split()[:2]) for line in done.stdout.splitlines()}
    expected = {(kind, name) for kind in plugins.KINDS for name in plugins.registered(kind)}
    assert names == expected


def test_fit_without_lightning_names_the_extra():
    done = run_without_lightning("fit", "--config", "configs/demo.yaml")
    assert done.returncode != 0
    assert 'pip install "lit-lowrank[lightning]"' in done.stderr
