"""Models: LLaMA and its mixture-of-experts variant by named size (pretraining); a pretrained encoder with a classification head
(fine-tuning), including the offline MiniLM."""

from lit_lowrank.extras import require

require("pretrain", "transformers")

from lit_lowrank.models.llama import LLAMA_SIZES, Llama, llama_config
from lit_lowrank.models.minilm import MINILM, minilm_path
from lit_lowrank.models.mixtral import Mixtral
from lit_lowrank.models.sequence_classifier import SequenceClassifier

__all__ = ["LLAMA_SIZES", "MINILM", "Llama", "Mixtral", "SequenceClassifier", "llama_config", "minilm_path"]
