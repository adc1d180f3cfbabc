"""Optional dependencies: each integration names the extra that installs what it needs.

The optimizer core needs only torch, numpy and pluggy; ``lit_lowrank.lightning`` and the CLI
need the ``lightning`` extra, pretraining data and LLaMA the ``pretrain`` extra, GLUE the
``glue`` extra, the bitsandbytes 8-bit format the ``bnb`` extra, plots the ``plot`` extra.
"""

from __future__ import annotations

import importlib.util


def require(extra: str, *modules: str) -> None:
    """Raise ``ModuleNotFoundError`` naming ``pip install "lit-lowrank[<extra>]"`` if any of
    ``modules`` is not installed."""
    missing = [module for module in modules if not installed(module)]
    if missing:
        raise ModuleNotFoundError(f"this part of lit_lowrank needs {', '.join(missing)}: "
                                  f'pip install "lit-lowrank[{extra}]"', name=missing[0])


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module blocked in sys.modules
        return False
