"""Data modules: litdata pretraining streams (:class:`PretrainData`), the embedded corpus and
its offline tokenizer; GLUE fine-tuning (:class:`GLUEDataModule`)."""

from lit_lowrank.data.glue import GLUEDataModule
from lit_lowrank.data.pretrain import PretrainData

__all__ = ["GLUEDataModule", "PretrainData"]
