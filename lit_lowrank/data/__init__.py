"""Data modules: litdata pretraining streams (:class:`PretrainData`, the ``pretrain`` extra), the
embedded corpus and its offline tokenizer; GLUE fine-tuning (:class:`GLUEDataModule`, the
``glue`` extra). Each is imported on first use, so one extra does not need the other's packages."""

from __future__ import annotations

from typing import Any

from lit_lowrank.extras import require

__all__ = ["GLUEDataModule", "PretrainData"]


def __getattr__(name: str) -> Any:
    if name == "GLUEDataModule":
        require("glue", "lightning", "datasets", "transformers")
        from lit_lowrank.data.glue import GLUEDataModule

        return GLUEDataModule
    if name == "PretrainData":
        require("pretrain", "lightning", "litdata", "tokenizers")
        from lit_lowrank.data.pretrain import PretrainData

        return PretrainData
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
