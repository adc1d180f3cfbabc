"""scripts/prepare_corpus.py on text files written by the test: the chunks hold exactly every
document's tokens (an independent tokenization), documents are read one shard at a time, and
the temporary directory is gone afterwards, also after an error."""

from __future__ import annotations

import json
import runpy
import tempfile
from pathlib import Path

import pytest
from litdata import StreamingDataset
from litdata.streaming.item_loader import TokensLoader
from tokenizers import Tokenizer

from lit_lowrank.data import pretrain
from lit_lowrank.data.pretrain import split_tail
from lit_lowrank.data.tokenizer import EOS, train_bpe

SCRIPT = Path(__file__).parents[2] / "scripts" / "prepare_corpus.py"
FILES = 7


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """``FILES`` text files of a few speeches each, a tokenizer trained on them, and
    ``tempfile``'s folder moved to an empty ``tmp_path/tmp``."""
    texts = ["".join(f"SPEAKER{i}:\nline {j} of file {i} " + "la " * (i + j) + "\n\n" for j in range(6))
             for i in range(FILES)]
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, text in enumerate(texts):
        (folder / f"doc{i}.txt").write_text(text, encoding="utf-8")
    tokenizer_path = tmp_path / "tokenizer.json"
    train_bpe(texts, 300).save(str(tokenizer_path))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    return texts, folder, tokenizer_path, scratch


def read_tokens(directory: Path) -> list[int]:
    dataset = StreamingDataset(str(directory), item_loader=TokensLoader(block_size=1), shuffle=False)
    return [int(token) for block in dataset for token in block]


def test_files_are_streamed_into_every_token(corpus, tmp_path, monkeypatch):
    texts, folder, tokenizer_path, scratch = corpus
    main = runpy.run_path(str(SCRIPT))["main"]
    files_read = []
    real_read_text = Path.read_text

    def counting_read_text(self, *args, **kwargs):
        if self.parent == folder:
            files_read.append(self.name)
        return real_read_text(self, *args, **kwargs)

    reads_at_call = []
    real_optimize = pretrain.optimize

    def recording_optimize(**kwargs):
        reads_at_call.append((len(files_read), len(kwargs["inputs"])))
        return real_optimize(**kwargs)

    monkeypatch.setattr(Path, "read_text", counting_read_text)
    monkeypatch.setattr(pretrain, "optimize", recording_optimize)
    output = tmp_path / "out"
    main(["files", str(folder / "*.txt"), "--tokenizer", str(tokenizer_path), "--output", str(output),
          "--val-fraction", "0.3", "--shard-docs", "3"])

    # train reads files 1-3, 4-6, 7; val reads them again: never ahead of the shard being written
    assert reads_at_call == [(3, 3), (6, 3), (7, 1), (10, 3), (13, 3), (14, 1)]
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    eos = tokenizer.token_to_id(EOS)
    pieces = [split_tail(text, 0.3) for text in texts]
    for split, part in (("train", 0), ("val", 1)):
        expected = [i for piece in pieces for i in tokenizer.encode(piece[part]).ids + [eos]]
        assert read_tokens(output / split) == expected
    assert json.loads((output / "meta.json").read_text())["vocab_size"] == tokenizer.get_vocab_size()
    assert list(scratch.iterdir()) == []


def test_temporary_directory_is_removed_on_error(corpus, tmp_path, monkeypatch):
    _, folder, tokenizer_path, scratch = corpus
    main = runpy.run_path(str(SCRIPT))["main"]

    def failing_optimize(**kwargs):
        assert any(scratch.iterdir())  # the working folders exist while litdata runs
        raise OSError("disk full")

    monkeypatch.setattr(pretrain, "optimize", failing_optimize)
    with pytest.raises(OSError, match="disk full"):
        main(["files", str(folder / "*.txt"), "--tokenizer", str(tokenizer_path), "--output", str(tmp_path / "out")])
    assert list(scratch.iterdir()) == []


def test_help_shows_the_module_docstring(capsys):
    main = runpy.run_path(str(SCRIPT))["main"]
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "Documents are streamed" in capsys.readouterr().out
