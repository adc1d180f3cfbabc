"""Pretraining data: token chunks written by ``litdata.optimize`` and streamed back with
``StreamingDataset``/``StreamingDataLoader`` from a local directory or any URI litdata reads
(``s3://``, ``gs://``, ...).

Layout of a prepared corpus (``scripts/prepare_corpus.py`` writes it)::

    <data_dir>/train/   litdata chunks of uint16/int32 token ids, documents joined by EOS
    <data_dir>/val/
    <data_dir>/meta.json  {"vocab_size": ..., "tokenizer": ...}  (optional, checked when local)

Without ``data_dir`` the embedded corpus (Shakespeare, :mod:`lit_lowrank.data.corpus`) is
tokenized and written under the cache directory on first use.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
import torch
from litdata import StreamingDataLoader, StreamingDataset, optimize
from litdata.streaming.item_loader import TokensLoader
from tokenizers import Tokenizer

from lit_lowrank.data.corpus import iter_texts, shakespeare_plays
from lit_lowrank.data.tokenizer import EOS, load_or_train

CACHE_ENV = "LIT_LOWRANK_CACHE"


def default_cache_dir() -> Path:
    """``$LIT_LOWRANK_CACHE``, else ``$XDG_CACHE_HOME/lit_lowrank`` (``~/.cache/lit_lowrank``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lit_lowrank"


class _Tokenize:
    """litdata worker function: one document → its token ids followed by EOS (1-D tensor)."""

    def __init__(self, tokenizer_path: str) -> None:
        self.tokenizer_path = tokenizer_path
        self._tokenizer: Tokenizer | None = None

    def __call__(self, document: str) -> Iterator[torch.Tensor]:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_file(self.tokenizer_path)
        ids = self._tokenizer.encode(document).ids + [self._tokenizer.token_to_id(EOS)]
        yield torch.tensor(ids, dtype=torch.int32)


LITDATA_WORK_ENV = {"DATA_OPTIMIZER_CACHE_FOLDER": "chunks", "DATA_OPTIMIZER_DATA_CACHE_FOLDER": "data"}
"""The environment variables naming ``litdata.optimize``'s working folders, which it empties on
start (by default the shared ``$TMPDIR/chunks`` and ``$TMPDIR/data``), and the subfolder each
gets in :func:`private_litdata_workdir`."""


@contextmanager
def private_litdata_workdir() -> Iterator[Path]:
    """A fresh folder for ``litdata.optimize``'s working files, removed on exit.

    ``optimize`` deletes its cache folders before it starts; by default they are the fixed
    ``$TMPDIR/chunks`` and ``$TMPDIR/data``, so it would delete a user's files there and two
    preparations at once would delete each other's chunks. Inside this context the variables of
    :data:`LITDATA_WORK_ENV` point into a private ``mkdtemp`` folder (inherited by litdata's worker
    processes); the caller's environment is restored on exit.
    """
    folder = Path(tempfile.mkdtemp(prefix="lit-lowrank-litdata-"))
    saved = {name: os.environ.get(name) for name in LITDATA_WORK_ENV}
    try:
        for name, subfolder in LITDATA_WORK_ENV.items():
            os.environ[name] = str(folder / subfolder)
        yield folder
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(folder, ignore_errors=True)


def batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    """Consecutive lists of ``size`` items (the last may be shorter), read lazily from ``items``."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def write_tokens(documents: Iterable[str], tokenizer_path: str | Path, output_dir: str | Path,
                 *, chunk_tokens: int = 1 << 20, num_workers: int = 1, shard_documents: int = 100_000) -> int:
    """Tokenize ``documents`` with the ``tokenizer.json`` at ``tokenizer_path`` into litdata
    token chunks of ``chunk_tokens`` ids at ``output_dir`` (a local path or a cloud URI).

    ``documents`` is read lazily, ``shard_documents`` at a time: each shard is one
    ``litdata.optimize`` call appending to ``output_dir`` (in order), so memory holds one shard,
    not the corpus. Returns the number of documents written.

    Raises:
        ValueError: if ``documents`` is empty.
    """
    if shard_documents < 1:
        raise ValueError(f"shard_documents must be >= 1, got {shard_documents}")
    written = 0
    with private_litdata_workdir():
        for shard in batches(documents, shard_documents):
            optimize(fn=_Tokenize(str(tokenizer_path)), inputs=shard, output_dir=str(output_dir),
                     chunk_size=chunk_tokens, item_loader=TokensLoader(), num_workers=num_workers,
                     verbose=False, start_method="fork", mode="append" if written else None)
            written += len(shard)
    if not written:
        raise ValueError(f"no documents to write to {output_dir}")
    return written


def split_tail(text: str, fraction: float) -> tuple[str, str]:
    """``(head, tail)`` with the last ``fraction`` of ``text`` in ``tail``, cut at the first
    blank line (speech boundary) after that point."""
    cut = int(len(text) * (1 - fraction))
    boundary = text.find("\n\n", cut)
    cut = len(text) if boundary < 0 else boundary + 2
    return text[:cut], text[cut:]


def shakespeare_splits(val_fraction: float) -> dict[str, list[str]]:
    """``{"train": [...], "val": [...]}``: validation is the last ``val_fraction`` of every play
    (all plays are represented in both splits; no speech is in both)."""
    pairs = [split_tail(text, val_fraction) for _, text in shakespeare_plays()]
    return {"train": [head for head, _ in pairs], "val": [tail for _, tail in pairs if tail]}


def write_splits(splits: dict[str, Iterable[str]], tokenizer_path: str | Path, output: str,
                 vocab_size: int, *, num_workers: int = 1, shard_documents: int = 100_000) -> None:
    """Token chunks of every split under ``output/<split>`` (each split's documents read lazily,
    see :func:`write_tokens`); for a local ``output`` also ``meta.json`` and a copy of the
    tokenizer."""
    for split, documents in splits.items():
        write_tokens(documents, tokenizer_path, f"{output.rstrip('/')}/{split}", num_workers=num_workers,
                     shard_documents=shard_documents)
    if "://" not in output:
        shutil.copy(tokenizer_path, Path(output, "tokenizer.json"))
        Path(output, "meta.json").write_text(json.dumps({"vocab_size": vocab_size, "tokenizer": "tokenizer.json"}))


PLACEHOLDER = "YOUR-BUCKET"
"""The bucket the shipped large-corpus configs name until the user writes theirs."""


def check_data_dir(data_dir: str | None) -> None:
    """Refuse, before anything starts, a ``data_dir`` that is the configs' placeholder or a local
    folder that does not exist (remote URIs are checked when streamed)."""
    if data_dir is None:
        return
    if PLACEHOLDER in data_dir:
        raise ValueError(f"data_dir is the placeholder {data_dir!r}: tokenize a corpus with "
                         "scripts/prepare_corpus.py and set --data.init_args.data_dir to its output (a local folder "
                         "or your bucket), or drop data_dir to train on the embedded Shakespeare corpus")
    if "://" not in data_dir and not Path(data_dir).is_dir():
        raise ValueError(f"data_dir {data_dir!r} is not a folder: prepare it with scripts/prepare_corpus.py "
                         "(it writes train/, val/ and meta.json there)")


def prepare_embedded(cache_dir: str | Path, vocab_size: int = 4096, val_fraction: float = 0.05) -> Path:
    """Tokenizer + train/val token chunks of the embedded corpus under ``cache_dir``, made once
    (written to a staging directory and renamed, so an interrupted run leaves nothing half-made).
    Returns the prepared directory."""
    cache_dir = Path(cache_dir)
    root = cache_dir / f"shakespeare-bpe{vocab_size}-val{val_fraction:g}"
    if (root / "meta.json").exists():
        return root
    tokenizer_path = cache_dir / f"shakespeare-bpe{vocab_size}.json"
    load_or_train(tokenizer_path, iter_texts(shakespeare_plays()), vocab_size)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache_dir))
    try:
        write_splits(shakespeare_splits(val_fraction), tokenizer_path, str(staging), vocab_size)
        if root.exists():  # another process finished first
            shutil.rmtree(staging)
        else:
            staging.rename(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root


class PretrainData(pl.LightningDataModule):
    """Token blocks of ``seq_len + 1`` ids, streamed by litdata, for :class:`CausalLM`.

    Args:
        data_dir: a prepared corpus (local directory or URI, with ``train/`` and ``val/``).
            ``None`` uses the embedded Shakespeare corpus, prepared into ``cache_dir`` on first use.
        seq_len: tokens the model sees per sequence (batches are ``(batch_size, seq_len + 1)``).
        batch_size: sequences per batch (per device).
        vocab_size: the tokenizer's vocabulary size; for the embedded corpus it is the BPE size
            trained; for a local ``data_dir`` it is checked against ``meta.json``.
        num_workers: loader worker processes.
        shuffle: shuffle training blocks (seeded by ``seed``, reproducible across resumes).
        cache_dir: where the embedded corpus and remote chunks are cached
            (default :func:`default_cache_dir`).
        val_fraction: held-out fraction of every play (embedded corpus only).

    The loaders are ``StreamingDataLoader``\\ s: Lightning saves their position in checkpoints,
    so ``fit(ckpt_path=...)`` continues with the next unseen batch.
    """

    def __init__(self, data_dir: str | None = None, seq_len: int = 256, batch_size: int = 8,
                 vocab_size: int = 4096, num_workers: int = 0, shuffle: bool = True, seed: int = 42,
                 cache_dir: str | None = None, val_fraction: float = 0.05) -> None:
        super().__init__()
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        check_data_dir(data_dir)
        self.data_dir, self.seq_len, self.batch_size = data_dir, seq_len, batch_size
        self.vocab_size, self.num_workers, self.shuffle, self.seed = vocab_size, num_workers, shuffle, seed
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.val_fraction = val_fraction
        self._datasets: dict[str, StreamingDataset] = {}

    def prepare_data(self) -> None:
        if self.data_dir is None:
            prepare_embedded(self.cache_dir, self.vocab_size, self.val_fraction)

    def resolved_dir(self) -> str:
        if self.data_dir is None:
            return str(prepare_embedded(self.cache_dir, self.vocab_size, self.val_fraction))
        return self.data_dir

    def setup(self, stage: str | None = None) -> None:
        root = self.resolved_dir()
        self._check_meta(root)
        for split in ("train", "val"):
            if split not in self._datasets:
                self._datasets[split] = StreamingDataset(
                    f"{root.rstrip('/')}/{split}", item_loader=TokensLoader(block_size=self.seq_len + 1),
                    shuffle=self.shuffle and split == "train", drop_last=True, seed=self.seed,
                    cache_dir=None if "://" not in root else str(self.cache_dir / "streams"))

    def _check_meta(self, root: str) -> None:
        meta = Path(root, "meta.json")
        if "://" in root or not meta.exists():
            return
        vocab = json.loads(meta.read_text())["vocab_size"]
        if vocab != self.vocab_size:
            raise ValueError(f"{root} was tokenized with {vocab} tokens but data.vocab_size is "
                             f"{self.vocab_size}; set data.vocab_size (and the model's) to {vocab}")

    def train_dataloader(self) -> StreamingDataLoader:
        return self._loader("train")

    def val_dataloader(self) -> StreamingDataLoader:
        return self._loader("val")

    def test_dataloader(self) -> StreamingDataLoader:
        return self._loader("val")

    def _loader(self, split: str) -> StreamingDataLoader:
        if split not in self._datasets:
            self.setup()
        return StreamingDataLoader(self._datasets[split], batch_size=self.batch_size,
                                   num_workers=self.num_workers, drop_last=True)
