"""Pretraining data: the litdata chunks hold exactly the tokenized documents, blocks are
contiguous windows of the corpus, splits are disjoint, and the loader resumes. Preparation
streams its documents shard by shard and runs litdata in a private working folder."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from litdata import StreamingDataset
from litdata.streaming.item_loader import TokensLoader
from tokenizers import Tokenizer

from lit_lowrank.data import PretrainData, pretrain
from lit_lowrank.data.pretrain import (
    LITDATA_WORK_ENV,
    prepare_embedded,
    shakespeare_splits,
    split_tail,
    write_tokens,
)
from lit_lowrank.data.tokenizer import EOS, train_bpe

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


# ---------------------------------------------------------------- litdata working folders, streaming
def read_tokens(directory) -> list[int]:
    """Every token id of a litdata token dataset, in stored order."""
    dataset = StreamingDataset(str(directory), item_loader=TokensLoader(block_size=1), shuffle=False)
    return [int(token) for block in dataset for token in block]


@pytest.fixture
def small_corpus(tmp_path):
    """Twelve short documents and a BPE trained on them (saved as tokenizer.json)."""
    documents = [f"document {i}: " + " ".join(f"w{i * j % 17}" for j in range(3 + i)) + "\n" for i in range(12)]
    tokenizer_path = tmp_path / "tokenizer.json"
    train_bpe(documents, 300).save(str(tokenizer_path))
    return documents, tokenizer_path


@pytest.fixture
def private_tmpdir(tmp_path, monkeypatch):
    """``$TMPDIR`` (and so ``tempfile.gettempdir()``, litdata's default cache root) moved into
    ``tmp_path``, holding a user's files where litdata's default working folders are."""
    tmp = tmp_path / "tmpdir"
    for name in ("chunks", "data"):
        (tmp / name).mkdir(parents=True)
        (tmp / name / "mine.txt").write_text("user file")
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read $TMPDIR
    for name in LITDATA_WORK_ENV:
        monkeypatch.delenv(name, raising=False)
    yield tmp
    tempfile.tempdir = None


def test_preparation_keeps_files_in_the_shared_tmp_folders(small_corpus, private_tmpdir, tmp_path):
    documents, tokenizer_path = small_corpus
    write_tokens(documents, tokenizer_path, tmp_path / "out", chunk_tokens=64)
    for name in ("chunks", "data"):
        assert (private_tmpdir / name / "mine.txt").read_text() == "user file"
    assert sorted(p.name for p in private_tmpdir.iterdir()) == ["chunks", "data"]  # private folder removed
    assert all(name not in os.environ for name in LITDATA_WORK_ENV)  # environment restored


def test_interleaved_preparations_keep_their_own_tokens(small_corpus, private_tmpdir, tmp_path, monkeypatch):
    """Preparation B runs in full while A is between two of its shards: each output holds exactly
    its own documents' tokens, and each ran with its own litdata working folder."""
    documents, tokenizer_path = small_corpus
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    folders = []
    real_optimize = pretrain.optimize

    def recording_optimize(**kwargs):
        folders.append(os.environ["DATA_OPTIMIZER_CACHE_FOLDER"])
        return real_optimize(**kwargs)

    monkeypatch.setattr(pretrain, "optimize", recording_optimize)

    def documents_of_a():
        yield from documents[:4]
        write_tokens(documents[6:], tokenizer_path, tmp_path / "b", chunk_tokens=64)
        yield from documents[4:6]

    write_tokens(documents_of_a(), tokenizer_path, tmp_path / "a", chunk_tokens=64, shard_documents=4)

    def expected(docs):
        return [i for d in docs for i in tokenizer.encode(d).ids + [tokenizer.token_to_id(EOS)]]

    assert read_tokens(tmp_path / "a") == expected(documents[:6])
    assert read_tokens(tmp_path / "b") == expected(documents[6:])
    a_first, b_only, a_second = folders
    assert a_first == a_second != b_only
    assert not any(Path(f).exists() for f in folders)
    assert all(Path(f).parent.parent == private_tmpdir for f in folders)


def test_write_tokens_reads_one_shard_at_a_time(small_corpus, tmp_path, monkeypatch):
    documents, tokenizer_path = small_corpus
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    consumed = 0

    def counted():
        nonlocal consumed
        for document in documents:
            consumed += 1
            yield document

    read_at_call = []
    real_optimize = pretrain.optimize

    def recording_optimize(**kwargs):
        read_at_call.append((consumed, len(kwargs["inputs"])))
        return real_optimize(**kwargs)

    monkeypatch.setattr(pretrain, "optimize", recording_optimize)
    assert write_tokens(counted(), tokenizer_path, tmp_path / "out", chunk_tokens=64, shard_documents=5) == 12
    assert read_at_call == [(5, 5), (10, 5), (12, 2)]  # never read ahead of the shard being written
    eos = tokenizer.token_to_id(EOS)
    assert read_tokens(tmp_path / "out") == [i for d in documents for i in tokenizer.encode(d).ids + [eos]]


def test_write_tokens_refuses_an_empty_corpus(small_corpus, tmp_path):
    _, tokenizer_path = small_corpus
    with pytest.raises(ValueError, match="no documents"):
        write_tokens(iter(()), tokenizer_path, tmp_path / "out")
