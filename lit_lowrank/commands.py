"""``python -m lit_lowrank``: the commands that need only the optimizer core run here —
``plugins`` (every registered component with its description) and ``plot`` (logged curves, with
the ``plot`` extra); ``fit``, ``validate``, ``test`` and ``--print_config`` go to the Lightning CLI
(:mod:`lit_lowrank.cli`, the ``lightning`` extra)."""

from __future__ import annotations

import inspect
import sys
from typing import Sequence

from lit_lowrank import plugins
from lit_lowrank.methods import Method


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m lit_lowrank`` and ``lit-lowrank``; ``argv`` defaults to the
    command line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["plugins"]:
        return print_plugins()
    if args[:1] == ["plot"]:
        from lit_lowrank.plot import main as plot

        return plot(args[1:])
    from lit_lowrank.cli import run_cli  # needs the lightning extra: says which pip install if missing

    run_cli(args)


def print_plugins() -> None:
    """One line per registered component: kind, name, what it does (a method: its description
    and settings; another component: its summary and class, see :func:`summary`), and the plugin
    providing it."""
    modules = [entry.component.__module__ for kind in plugins.KINDS for entry in plugins.registered(kind).values()
               if not isinstance(entry.component, Method)]  # a module of several components: their class docs
    for kind in plugins.KINDS:
        entries = plugins.registered(kind)
        for name, entry in sorted(entries.items()):
            print(f"{kind:<17} {name:<16} {describe(entry.component, modules)}  [{entry.provider}]")


def describe(component: object, modules: list[str]) -> str:
    """``"Lion's sign update on R  {inner: lion}"`` for a :class:`Method`;
    ``"<summary>  (lit_lowrank.projectors.svd.SVDProjector)"`` for a class."""
    if isinstance(component, Method):
        settings = ", ".join(f"{key}: {value}" for key, value in component.settings().items())
        return f"{component.description}  {{{settings}}}"
    path = f"{component.__module__}.{component.__qualname__}"
    text = summary(component, shares_module=modules.count(component.__module__) > 1)
    return f"{text}  ({path})" if text else path


def summary(component: object, *, shares_module: bool) -> str:
    """The first paragraph of the docstring of the component's module (the paper and what it
    computes), or of its class where several components of one kind share a module."""
    source = component if shares_module else sys.modules.get(component.__module__, component)
    return (inspect.getdoc(source) or "").split("\n\n")[0].replace("\n", " ").strip()
