"""An offline byte-level BPE tokenizer, trained with HF ``tokenizers`` on the embedded corpus
and cached as ``tokenizer.json`` (any text is encodable: bytes are the base alphabet)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
    """A byte-level BPE (GPT-2 pre-tokenization) with ``vocab_size`` tokens, ``EOS`` being id 0.

    Deterministic for the same texts in the same order: the trainer counts pairs exactly and
    breaks ties by a fixed ordering.
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size must exceed the 256 byte tokens plus EOS, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_or_train(path: str | Path, texts: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
    """The tokenizer cached at ``path`` (a ``tokenizer.json``), training and saving it first if
    absent. A cached file of a different vocabulary size is an error, not silently reused."""
    path = Path(path)
    if path.exists():
        tokenizer = Tokenizer.from_file(str(path))
        if tokenizer.get_vocab_size() != vocab_size:
            raise ValueError(f"{path} has {tokenizer.get_vocab_size()} tokens, not {vocab_size}; "
                             "delete it or point the cache elsewhere")
        return tokenizer
    tokenizer = train_bpe(texts, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tokenizer.save(str(tmp))
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    return tokenizer
