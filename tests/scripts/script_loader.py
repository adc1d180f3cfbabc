"""Load a script of ``scripts/`` (not a package) as a module, as ``python scripts/<name>.py``
would run it: with ``scripts/`` on ``sys.path``, so that one script can import another."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator

SCRIPTS = Path(__file__).parents[2] / "scripts"


def loaded_script(name: str) -> Iterator[ModuleType]:
    """Yield the module of ``scripts/<name>.py``; afterwards it and the path entry are gone."""
    sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
        sys.path.remove(str(SCRIPTS))
