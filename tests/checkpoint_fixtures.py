"""The checkpoints written by earlier code (``tests/fixtures/checkpoints/``) and the module that
wrote them (``make_fixtures.py``: the tiny model, the recipes, the batches), loaded by path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"


def _load_maker():
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fixtures = _load_maker()
