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
"""

from __future__ import annotations

import argparse
import glob
import itertools
import tempfile
from pathlib import Path

from lit_lowrank.data.corpus import iter_texts, shakespeare_plays
from lit_lowrank.data.pretrain import shakespeare_splits, split_tail, write_splits
from lit_lowrank.data.tokenizer import load_or_train


def resolve_tokenizer(name: str, workdir: Path) -> tuple[Path, int]:
    """A ``tokenizer.json`` path and its vocabulary size, from a file or a HF hub name."""
    from tokenizers import Tokenizer

    if Path(name).exists():
        tokenizer = Tokenizer.from_file(name)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name).backend_tokenizer
        name = str(workdir / "tokenizer.json")
        tokenizer.save(name)
    return Path(name), tokenizer.get_vocab_size()


def hub_documents(args: argparse.Namespace, split: str, count: int) -> list[str]:
    """The first ``count`` documents of a HF hub dataset split, streamed (no full download)."""
    from datasets import load_dataset

    stream = load_dataset(args.dataset, args.name, split=split, streaming=True)
    return [row[args.text_field] for row in itertools.islice(stream, count)]


def main() -> None:
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
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="prepare-corpus-"))
    if args.source == "shakespeare":
        tokenizer_path, vocab_size = workdir / "tokenizer.json", args.vocab_size
        load_or_train(tokenizer_path, iter_texts(shakespeare_plays()), vocab_size)
        splits = shakespeare_splits(args.val_fraction)
    else:
        if not args.tokenizer:
            parser.error("--tokenizer is required for hf and files sources")
        tokenizer_path, vocab_size = resolve_tokenizer(args.tokenizer, workdir)
        if args.source == "files":
            texts = [Path(f).read_text(encoding="utf-8") for f in sorted(glob.glob(args.pattern or ""))]
            if not texts:
                parser.error(f"no file matches {args.pattern!r}")
            pairs = [split_tail(t, args.val_fraction) for t in texts]
            splits = {"train": [h for h, _ in pairs], "val": [t for _, t in pairs if t]}
        else:
            splits = {"train": hub_documents(args, "train", args.train_docs),
                      "val": hub_documents(args, "validation", args.val_docs)}
    write_splits(splits, tokenizer_path, args.output, vocab_size, num_workers=args.num_workers)
    print(f"wrote {args.output} (vocab_size={vocab_size}); train with data.init_args.data_dir={args.output} "
          f"and vocab_size {vocab_size} for both data and network")

if __name__ == "__main__":
    main()
