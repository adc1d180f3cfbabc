"""The plugin manager: built-ins and installed packages register components by name.

Built-in modules (``lit_lowrank.builtins.BUILTIN_MODULES``) and every entry point of the
``lit_lowrank`` group are registered with one :class:`pluggy.PluginManager`. Components are then
looked up by kind and name, e.g. ``get("projectors", "svd")``; named methods (recipes
combining them) are registered the same way.

A bare name always means the built-in component when one has it: a plugin registering ``svd``
does not replace the built-in; its projector is reachable as ``<package>:svd`` (as is any
plugin's component). Two plugins registering the same name make the bare name ambiguous: it is
refused, and each is reachable as ``<package>:<name>``. ``<package>`` is the distribution's name
for an installed plugin (the name given to :func:`register_plugin` up to a ``:``, for one
registered in code), and ``lit_lowrank`` for the built-ins (``lit_lowrank:svd``). A plugin may
register a name containing ``:`` only under its own package (``<its package>:<name>``); a hook
registering a name under another package's prefix is skipped with a warning. A plugin whose
import or hook fails (``sys.exit()`` included) is skipped with a warning, and nothing it
registered in that call is kept.

Checkpoints record each component by :func:`qualified_name` and :func:`class_path` (see
lit_lowrank/optim/checkpoint.py), so a resume finds the same class or refuses.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points

import pluggy

from lit_lowrank import hookspecs
from lit_lowrank.methods import Method

BUILTIN_PACKAGE = "lit_lowrank"
"""The package that qualifies the built-in components' names (``lit_lowrank:svd``)."""
KINDS = ("projectors", "quantizers", "update_rules", "inner_optimizers", "schedules", "transforms", "methods")
DISABLE_ENTRYPOINTS_ENV = "LIT_LOWRANK_DISABLE_ENTRYPOINTS"


@dataclass(frozen=True)
class Entry:
    """One registered component — a class, or a :class:`~lit_lowrank.methods.Method` — and the
    plugin (package) that provided it."""

    component: object
    provider: str


class UnknownComponentError(KeyError):
    """Raised when a name is not registered; the message lists the registered names."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


_manager: pluggy.PluginManager | None = None
_registries: dict[str, dict[str, Entry]] | None = None
_ambiguous: dict[str, dict[str, list[str]]] = {}
"""Bare names that several plugins register (and no built-in does), by kind: the qualified names."""


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
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a broken plugin (even one calling sys.exit()) must not take the others down
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
    """All components of ``kind`` (one of :data:`KINDS`), by name (qualified ``<package>:<name>``
    for a plugin's component whose bare name is taken by a built-in or another plugin)."""
    global _registries, _ambiguous
    if _registries is None:
        _registries, _ambiguous = _collect(plugin_manager())
    if kind not in _registries:
        raise ValueError(f"unknown component kind {kind!r}; expected one of {KINDS}")
    return _registries[kind]


def _collect(manager: pluggy.PluginManager) -> tuple[dict[str, dict[str, Entry]], dict[str, dict[str, list[str]]]]:
    """Call every ``register_<kind>`` hook, built-ins first; returns the registries and the
    ambiguous bare names."""
    registries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
    ambiguous: dict[str, dict[str, list[str]]] = {kind: {} for kind in KINDS}
    for kind in KINDS:
        impls = getattr(manager.hook, f"register_{kind}").get_hookimpls()
        for impl in sorted(impls, key=lambda impl: not _is_builtin(impl.plugin_name)):
            for name, cls in _call_hook(impl, kind):
                _add(registries[kind], ambiguous[kind], kind, name, Entry(cls, impl.plugin_name))
    return registries, ambiguous


def _call_hook(impl: pluggy.HookImpl, kind: str) -> list[tuple[str, type]]:
    """What one plugin's ``register_<kind>`` registers: all of it, or nothing if it fails."""
    offered: list[tuple[str, type]] = []
    try:
        impl.function(register=lambda name, cls: offered.append((name, cls)))
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        warnings.warn(
            f"lit_lowrank plugin {impl.plugin_name!r} failed in register_{kind} "
            f"({type(exc).__name__}: {exc}); its {kind} are skipped.",
            RuntimeWarning,
            stacklevel=4,
        )
        return []
    if kind == "methods" and not all(isinstance(method, Method) for _, method in offered):
        warnings.warn(f"lit_lowrank plugin {impl.plugin_name!r} registered a method that is not a "
                      "lit_lowrank.Method; its methods are skipped.", RuntimeWarning, stacklevel=4)
        return []
    package = _package(impl.plugin_name)
    foreign = next((name for name, _ in offered if ":" in name and name.split(":")[0] != package), None)
    if foreign is not None:
        warnings.warn(f"lit_lowrank plugin {impl.plugin_name!r} registered {kind[:-1]} {foreign!r}, a name qualified "
                      f"by another package than its own ({package!r}); its {kind} are skipped. Register the bare "
                      f"name: it is reachable as {package}:<name>.", RuntimeWarning, stacklevel=4)
        return []
    return offered


def _add(registry: dict[str, Entry], ambiguous: dict[str, list[str]], kind: str, name: str, entry: Entry) -> None:
    """Register ``entry`` as ``name``; on a clash with another class the built-in keeps the bare
    name, and plugins' components go under their qualified names."""
    current = registry.get(name)
    if current is not None and current.component is entry.component:
        return
    if current is None and name not in ambiguous:
        registry[name] = entry
        return
    qualified = _qualified(name, entry.provider)
    registry[qualified] = entry
    if current is not None and _is_builtin(current.provider):
        warnings.warn(f"{kind[:-1]} {name!r} from {entry.provider!r} has the name of a built-in; {name!r} "
                      f"stays the built-in, the plugin's is {qualified!r}", RuntimeWarning, stacklevel=5)
        return
    if current is not None:  # the first plugin's entry moves to its qualified name too
        del registry[name]
        registry[_qualified(name, current.provider)] = current
        ambiguous[name] = [_qualified(name, current.provider)]
    ambiguous[name].append(qualified)
    warnings.warn(f"{kind[:-1]} {name!r} is registered by several plugins; name one of {ambiguous[name]}",
                  RuntimeWarning, stacklevel=5)


def _qualified(name: str, provider: str) -> str:
    """``<package>:<name>`` (``name`` itself if it is qualified already)."""
    return name if ":" in name else f"{_package(provider)}:{name}"


def _package(provider: str) -> str:
    """The package a provider's names are qualified by: :data:`BUILTIN_PACKAGE` for a built-in
    module; else the provider up to ``:`` (an entry point's provider is ``<package>:<entry point>``)."""
    return BUILTIN_PACKAGE if _is_builtin(provider) else provider.split(":")[0]


def _is_builtin(provider: str) -> bool:
    from lit_lowrank.builtins import BUILTIN_MODULES

    return provider in BUILTIN_MODULES


def get(kind: str, name: str) -> object:
    """The component registered as ``name`` (or ``<package>:<name>``); raises
    :class:`UnknownComponentError` listing the names, or naming the plugins of an ambiguous name."""
    return _entry(kind, name).component


def qualified_name(kind: str, name: str) -> str:
    """The ``<package>:<name>`` of the component ``name`` resolves to (``svd`` →
    ``lit_lowrank:svd``): the name that keeps meaning it when other plugins take the bare name."""
    return _qualified(name, _entry(kind, name).provider)


def class_path(cls: type) -> str:
    """``<module>.<qualname>`` of a registered class: what a checkpoint compares on resume."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _entry(kind: str, name: str) -> Entry:
    """The entry ``name`` resolves to (see :func:`get`)."""
    registry = registered(kind)
    entry = registry.get(name)
    if entry is None and isinstance(name, str) and ":" in name:  # a component by package
        bare = name.split(":", 1)[1]
        candidate = registry.get(bare)
        if candidate is not None and _qualified(bare, candidate.provider) == name:
            entry = candidate
    if entry is not None:
        return entry
    label = kind[:-1].replace("_", " ")
    if name in _ambiguous.get(kind, {}):
        raise UnknownComponentError(f"{label} {name!r} is registered by several plugins: "
                                    f"{', '.join(_ambiguous[kind][name])}; name one of them.")
    known = ", ".join(sorted(registry)) or "(none)"
    raise UnknownComponentError(
        f"unknown {label} {name!r}. Registered: {known}. "
        f"Install the package that provides it, or run `python -m lit_lowrank plugins`."
    )


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


def get_transform(name: str) -> type:
    """The :class:`~lit_lowrank.transforms.Transform` subclass registered as ``name``."""
    return get("transforms", name)


def get_method(name: str) -> Method:
    """The :class:`~lit_lowrank.methods.Method` registered as ``name``."""
    return get("methods", name)
