"""The plugin manager: built-ins and installed packages register components by name.

Built-in modules (``lit_lowrank.builtins.BUILTIN_MODULES``) and every entry point of the
``lit_lowrank`` group are registered with one :class:`pluggy.PluginManager`. Components are then
looked up by kind and name, e.g. ``get("projectors", "svd")``.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points

import pluggy

from lit_lowrank import hookspecs

KINDS = ("projectors", "quantizers", "update_rules", "inner_optimizers", "schedules")
DISABLE_ENTRYPOINTS_ENV = "LIT_LOWRANK_DISABLE_ENTRYPOINTS"


@dataclass(frozen=True)
class Entry:
    """One registered component: the class and the plugin (package) that provided it."""

    cls: type
    provider: str


class UnknownComponentError(KeyError):
    """Raised when a name is not registered; the message lists the registered names."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


_manager: pluggy.PluginManager | None = None
_registries: dict[str, dict[str, Entry]] | None = None


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager, built on first use (built-ins, then entry points)."""
    global _manager
    if _manager is None:
        from lit_lowrank.builtins import BUILTIN_MODULES

        manager = pluggy.PluginManager("lit_lowrank")
        manager.add_hookspecs(hookspecs)
        for module_name in BUILTIN_MODULES:
            manager.register(importlib.import_module(module_name), name=module_name)
        manager.check_pending()
        if not os.environ.get(DISABLE_ENTRYPOINTS_ENV):
            _load_entrypoints(manager)
        _manager = manager
    return _manager


def _load_entrypoints(manager: pluggy.PluginManager) -> None:
    """Register every ``lit_lowrank`` entry point, as ``manager.load_setuptools_entrypoints``
    would, but one at a time: pluggy's loader stops at the first plugin that fails to import,
    while here that plugin is skipped with a warning naming its package and the rest load."""
    for ep in entry_points(group="lit_lowrank"):
        package = ep.dist.name if ep.dist else ep.value
        try:
            manager.register(ep.load(), name=f"{package}:{ep.name}")
            manager.check_pending()
        except Exception as exc:  # a broken plugin must not take the others down
            stale = manager.get_plugin(f"{package}:{ep.name}")
            if stale is not None:
                manager.unregister(stale)
            warnings.warn(
                f"lit_lowrank plugin {ep.name!r} from package {package!r} failed to load "
                f"({type(exc).__name__}: {exc}); it is skipped. Upgrade or uninstall "
                f"{package!r} to silence this.",
                RuntimeWarning,
                stacklevel=3,
            )


def register_plugin(plugin: object, name: str | None = None) -> None:
    """Register a module or object with ``@hookimpl`` functions (used by tests and notebooks)."""
    plugin_manager().register(plugin, name=name)
    _invalidate()


def unregister_plugin(name: str) -> None:
    plugin_manager().unregister(name=name)
    _invalidate()


def reset() -> None:
    """Forget the manager; the next lookup rebuilds it (re-reading entry points)."""
    global _manager
    _manager = None
    _invalidate()


def _invalidate() -> None:
    global _registries
    _registries = None


def registered(kind: str) -> dict[str, Entry]:
    """All components of ``kind`` (one of :data:`KINDS`), by name."""
    global _registries
    if _registries is None:
        _registries = _collect(plugin_manager())
    if kind not in _registries:
        raise ValueError(f"unknown component kind {kind!r}; expected one of {KINDS}")
    return _registries[kind]


def _collect(manager: pluggy.PluginManager) -> dict[str, dict[str, Entry]]:
    registries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
    for kind in KINDS:
        for impl in getattr(manager.hook, f"register_{kind}").get_hookimpls():
            registry = registries[kind]

            def register(name: str, cls: type, _registry=registry, _provider=impl.plugin_name) -> None:
                if name in _registry and _registry[name].cls is not cls:
                    warnings.warn(
                        f"{kind[:-1]} {name!r} from {_provider!r} replaces the one from "
                        f"{_registry[name].provider!r}",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                _registry[name] = Entry(cls, _provider)

            try:
                impl.function(register=register)
            except Exception as exc:
                warnings.warn(
                    f"lit_lowrank plugin {impl.plugin_name!r} failed in register_{kind} "
                    f"({type(exc).__name__}: {exc}); its {kind} are skipped.",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return registries


def get(kind: str, name: str) -> type:
    """The class registered as ``name``; raises :class:`UnknownComponentError` listing the names."""
    registry = registered(kind)
    if name not in registry:
        known = ", ".join(sorted(registry)) or "(none)"
        raise UnknownComponentError(
            f"unknown {kind[:-1].replace('_', ' ')} {name!r}. Registered: {known}. "
            f"Install the package that provides it, or run `python -m lit_lowrank plugins`."
        )
    return registry[name].cls


def get_projector(name: str) -> type:
    return get("projectors", name)


def get_quantizer(name: str) -> type:
    return get("quantizers", name)


def get_update_rule(name: str) -> type:
    return get("update_rules", name)


def get_inner_optimizer(name: str) -> type:
    return get("inner_optimizers", name)


def get_schedule(name: str) -> type:
    return get("schedules", name)
