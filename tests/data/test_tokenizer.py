"""The offline BPE: lossless, deterministic, cached, and refusing a cache of another size."""

from __future__ import annotations

import pytest

from lit_lowrank.data.corpus import shakespeare_plays
from lit_lowrank.data.tokenizer import EOS, load_or_train, train_bpe


@pytest.fixture(scope="module")
def texts():
    return [text for _, text in shakespeare_plays()[:4]]


def test_lossless_and_eos_first(texts):
    tokenizer = train_bpe(texts, 400)
    assert tokenizer.get_vocab_size() == 400
    assert tokenizer.token_to_id(EOS) == 0
    sample = texts[0][:2000] + " naïve — ünïcode ✓"
    assert tokenizer.decode(tokenizer.encode(sample).ids) == sample
    assert len(tokenizer.encode(texts[0]).ids) < 0.7 * len(texts[0].encode())  # merges compress


def test_deterministic(texts):
    assert train_bpe(texts, 400).to_str() == train_bpe(texts, 400).to_str()


def test_cached_and_size_checked(texts, tmp_path):
    path = tmp_path / "tok.json"
    trained = load_or_train(path, texts, 300)
    assert path.exists()
    assert load_or_train(path, iter(()), 300).to_str() == trained.to_str()  # no texts needed
    with pytest.raises(ValueError, match="delete it"):
        load_or_train(path, texts, 500)
