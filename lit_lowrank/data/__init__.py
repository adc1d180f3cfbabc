"""Data modules: litdata pretraining streams (:class:`PretrainData`), the embedded corpus and
its offline tokenizer."""

from lit_lowrank.data.pretrain import PretrainData

__all__ = ["PretrainData"]
