"""Tokenize a text corpus into litdata token chunks for ``lit_lowrank.data.PretrainData``.

Writes ``<output>/train``, ``<output>/val`` and ``<output>/meta.json``; ``<output>`` may be a
local directory or a cloud URI litdata can write (``s3://bucket/c4-t5``).

Examples::

    # the embedded Shakespeare corpus with a freshly trained 4096-token BPE
    python scripts/prepare_corpus.py shakespeare --output data/shakespeare

    # C4 as in the GaLore papers (T5 tokenizer, 32000 ids), streamed from the HF hub
    python scripts/prepare_corpus.py hf --dataset allenai/c4 --name en --tokenizer t5-base \\
        --train-docs 2000000 --val-docs 10000 --output s3://my-bucket/c4-t5

    # your own text files (one document per file)
    python scripts/prepare_corpus.py files 'corpus/*.txt' --tokenizer tokenizer.json --output data/mine

Documents are streamed: at most ``--shard-docs`` of them are in memory at once (each shard is
tokenized by one ``litdata.optimize`` call appending to the output), so the C4 command above runs
in the memory of one shard. Temporary files (a hub tokenizer's ``tokenizer.json``, litdata's
working folders) live in a private temporary directory, removed on exit, also on error.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lit_lowrank.data.corpus import iter_texts, shakespeare_plays
from lit_lowrank.data.pretrain import shakespeare_splits, split_tail, write_splits
from lit_lowrank.data.tokenizer import load_or_train


def resolve_tokenizer(name: str, workdir: Path) -> tuple[Path, int]:
    """A ``tokenizer.json`` path and its vocabulary size, from a file or a HF hub name (saved
    into ``workdir``)."""
    from tokenizers import Tokenizer

    if Path(name).exists():
        tokenizer = Tokenizer.from_file(name)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name).backend_tokenizer
        name = str(workdir / "tokenizer.json")
        tokenizer.save(name)
    return Path(name), tokenizer.get_vocab_size()


def hub_documents(args: argparse.Namespace, split: str, count: int) -> Iterator[str]:
    """The first ``count`` documents of a HF hub dataset split, streamed (no full download)."""
    from datasets import load_dataset

    stream = load_dataset(args.dataset, args.name, split=split, streaming=True)
    return (row[args.text_field] for row in itertools.islice(stream, count))


def file_documents(paths: list[str], val_fraction: float, part: int) -> Iterator[str]:
    """Each file's head (``part=0``) or non-empty held-out tail (``part=1``, the last
    ``val_fraction``, cut at a blank line), one file read at a time."""
    for path in paths:
        piece = split_tail(Path(path).read_text(encoding="utf-8"), val_fraction)[part]
        if piece or part == 0:
            yield piece


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", choices=["shakespeare", "hf", "files"])
    parser.add_argument("pattern", nargs="?", help="glob of text files (source=files)")
    parser.add_argument("--output", required=True, help="output directory or URI")
    parser.add_argument("--tokenizer", help="tokenizer.json path or HF hub name (hf/files)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE size (shakespeare)")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="held-out tail (shakespeare/files)")
    parser.add_argument("--dataset", default="allenai/c4")
    parser.add_argument("--name", default="en", help="dataset configuration")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--train-docs", type=int, default=100_000)
    parser.add_argument("--val-docs", type=int, default=5_000)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--shard-docs", type=int, default=100_000,
                        help="documents held in memory and tokenized per litdata.optimize call")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point; ``argv`` defaults to the command line."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.source != "shakespeare" and not args.tokenizer:
        parser.error("--tokenizer is required for hf and files sources")
    if args.shard_docs < 1:
        parser.error(f"--shard-docs must be >= 1, got {args.shard_docs}")
    with tempfile.TemporaryDirectory(prefix="prepare-corpus-") as tmp:
        workdir = Path(tmp)
        if args.source == "shakespeare":
            tokenizer_path, vocab_size = workdir / "tokenizer.json", args.vocab_size
            load_or_train(tokenizer_path, iter_texts(shakespeare_plays()), vocab_size)
            splits = shakespeare_splits(args.val_fraction)
        else:
            tokenizer_path, vocab_size = resolve_tokenizer(args.tokenizer, workdir)
            if args.source == "files":
                paths = sorted(glob.glob(args.pattern or ""))
                if not paths:
                    parser.error(f"no file matches {args.pattern!r}")
                splits = {"train": file_documents(paths, args.val_fraction, 0),
                          "val": file_documents(paths, args.val_fraction, 1)}
            else:
                splits = {"train": hub_documents(args, "train", args.train_docs),
                          "val": hub_documents(args, "validation", args.val_docs)}
        write_splits(splits, tokenizer_path, args.output, vocab_size, num_workers=args.num_workers,
                     shard_documents=args.shard_docs)
    print(f"wrote {args.output} (vocab_size={vocab_size}); train with data.init_args.data_dir={args.output} "
          f"and vocab_size {vocab_size} for both data and network")


if __name__ == "__main__":
    main()
