"""Pretraining data: the litdata chunks hold exactly the tokenized documents, blocks are
contiguous windows of the corpus, splits are disjoint, and the loader resumes."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer

from lit_lowrank.data import PretrainData
from lit_lowrank.data.pretrain import prepare_embedded, shakespeare_splits, split_tail

VOCAB = 512


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "lit_lowrank_cache"
    return cache, prepare_embedded(cache, VOCAB)


def test_split_tail_cuts_at_a_speech_boundary():
    text = "A:\none\n\nB:\ntwo\n\nC:\nthree\n"
    head, tail = split_tail(text, 0.5)  # the cut point falls inside "two"
    assert head + tail == text
    assert head.endswith("\n\n") and tail.startswith("C:")


def test_chunks_hold_every_token_of_the_documents(prepared):
    _, root = prepared
    assert json.loads((root / "meta.json").read_text())["vocab_size"] == VOCAB
    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    docs = shakespeare_splits(0.05)
    for split in ("train", "val"):
        expected = sum(len(tokenizer.encode(d).ids) + 1 for d in docs[split])  # + EOS per document
        index = json.loads((root / split / "index.json").read_text())
        stored = sum(chunk["dim"] for chunk in index["chunks"])  # tokens per chunk
        assert stored == expected


def test_blocks_are_windows_of_the_held_out_text(prepared):
    cache, root = prepared
    data = PretrainData(seq_len=48, batch_size=2, vocab_size=VOCAB, cache_dir=str(cache), shuffle=False)
    data.setup()
    batch = next(iter(data.val_dataloader()))
    assert batch.shape == (2, 49)
    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    val_text = "".join(shakespeare_splits(0.05)["val"])
    train_text = "".join(shakespeare_splits(0.05)["train"])
    for row in batch:
        window = tokenizer.decode(row.tolist())
        assert window in val_text and window not in train_text


def test_vocab_mismatch_names_the_fix(prepared):
    cache, root = prepared
    with pytest.raises(ValueError, match="set data.vocab_size"):
        PretrainData(data_dir=str(root), vocab_size=1000).setup()


def test_loader_state_resumes_with_the_next_batch(prepared):
    cache, _ = prepared

    def loader():
        data = PretrainData(seq_len=16, batch_size=4, vocab_size=VOCAB, cache_dir=str(cache), seed=3)
        data.setup()
        return data.train_dataloader()

    first = loader()
    iterator = iter(first)
    seen = [next(iterator) for _ in range(3)]
    state = first.state_dict()
    expected = next(iterator)
    resumed = loader()
    resumed.load_state_dict(state)
    torch.testing.assert_close(next(iter(resumed)), expected)
    assert not torch.equal(seen[0], expected)
