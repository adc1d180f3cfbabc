"""Command line: ``python -m lit_lowrank plugins`` lists every registered component."""

from __future__ import annotations

import sys

from lit_lowrank import plugins


def print_plugins() -> None:
    """One line per registered component: kind, name, providing plugin."""
    for kind in plugins.KINDS:
        for name, entry in sorted(plugins.registered(kind).items()):
            print(f"{kind:<17} {name:<16} {entry.cls.__module__}.{entry.cls.__qualname__}  [{entry.provider}]")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plugins"]:
        print_plugins()
        return
    raise SystemExit("usage: python -m lit_lowrank plugins")
