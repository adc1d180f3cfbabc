"""The plugin manager: lookup by name, in-test plugins, entry points, broken plugins."""

from __future__ import annotations

import sys
import textwrap

import pytest

import lit_lowrank
from lit_lowrank import hookimpl
from lit_lowrank.projectors.svd import SVDProjector


def test_builtins_register_through_the_hooks(fresh_plugins):
    entry = fresh_plugins.registered("projectors")["svd"]
    assert entry.component is SVDProjector
    assert entry.provider == "lit_lowrank.projectors.svd"


def test_unknown_name_lists_registered_names(fresh_plugins):
    with pytest.raises(lit_lowrank.UnknownComponentError) as excinfo:
        fresh_plugins.get_projector("no-such-projector")
    message = str(excinfo.value)
    assert "'no-such-projector'" in message
    for name in fresh_plugins.registered("projectors"):
        assert name in message
    assert "python -m lit_lowrank plugins" in message


def test_unknown_name_fails_when_the_optimizer_is_built(fresh_plugins):
    import torch

    with pytest.raises(lit_lowrank.UnknownComponentError, match="unknown update rule 'nope'"):
        lit_lowrank.LowRankOptimizer([{"params": [torch.zeros(4, 4, requires_grad=True)], "lowrank": True}], rule="nope")


class _EchoProjector(SVDProjector):
    pass


class _InTestPlugin:
    @hookimpl
    def register_projectors(self, register):
        register("echo", _EchoProjector)


def test_in_test_plugin_is_found_by_name(fresh_plugins):
    fresh_plugins.register_plugin(_InTestPlugin(), name="in-test")
    assert fresh_plugins.get_projector("echo") is _EchoProjector
    assert fresh_plugins.registered("projectors")["echo"].provider == "in-test"
    fresh_plugins.unregister_plugin("in-test")
    with pytest.raises(lit_lowrank.UnknownComponentError):
        fresh_plugins.get_projector("echo")


def test_plugin_whose_hook_raises_warns_and_the_rest_works(fresh_plugins):
    class Broken:
        @hookimpl
        def register_projectors(self, register):
            raise ImportError("needs libfoo")

    fresh_plugins.register_plugin(Broken(), name="broken-plugin")
    with pytest.warns(RuntimeWarning, match="broken-plugin.*needs libfoo"):
        names = fresh_plugins.registered("projectors")
    assert "svd" in names


def _install_fake_distribution(tmp_path, monkeypatch, name: str, entry_point: str, module_source: str | None):
    """A real (unzipped) distribution on sys.path, as pip would leave it."""
    dist_info = tmp_path / f"{name}-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(f"[lit_lowrank]\n{entry_point}\n")
    if module_source is not None:
        module = entry_point.split("=")[1].strip()
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(module_source))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_entry_point_plugin_is_loaded(tmp_path, monkeypatch, fresh_plugins):
    _install_fake_distribution(tmp_path, monkeypatch, "lit-lowrank-fake", "fake = lit_lowrank_fake_mod", """
        from lit_lowrank import hookimpl
        from lit_lowrank.projectors.svd import SVDProjector

        class FakeProjector(SVDProjector):
            pass

        @hookimpl
        def register_projectors(register):
            register("fake", FakeProjector)
    """)
    monkeypatch.delenv(fresh_plugins.DISABLE_ENTRYPOINTS_ENV)
    fresh_plugins.reset()
    entry = fresh_plugins.registered("projectors")["fake"]
    assert entry.component.__name__ == "FakeProjector"
    assert entry.provider == "lit-lowrank-fake:fake"
    monkeypatch.setenv(fresh_plugins.DISABLE_ENTRYPOINTS_ENV, "1")
    sys.modules.pop("lit_lowrank_fake_mod", None)


@pytest.mark.parametrize("package, value, source, failure", [
    ("lit-lowrank-broken", "broken = lit_lowrank_missing_module", None, "ModuleNotFoundError"),
    ("lit-lowrank-exits", "exits = lit_lowrank_exits_mod", """
        import sys
        sys.exit("no GPU here")
    """, "SystemExit: no GPU here"),
], ids=["missing-module", "sys-exit"])
def test_entry_point_failing_at_import_is_skipped_naming_its_package(tmp_path, monkeypatch, fresh_plugins, package,
                                                                     value, source, failure):
    _install_fake_distribution(tmp_path, monkeypatch, package, value, source)
    monkeypatch.delenv(fresh_plugins.DISABLE_ENTRYPOINTS_ENV)
    fresh_plugins.reset()
    with pytest.warns(RuntimeWarning, match=rf"'{package}' failed to load \({failure}"):
        projectors = fresh_plugins.registered("projectors")
    assert "svd" in projectors
    monkeypatch.setenv(fresh_plugins.DISABLE_ENTRYPOINTS_ENV, "1")
    sys.modules.pop("lit_lowrank_exits_mod", None)


def test_hook_typo_in_entry_point_is_refused(tmp_path, monkeypatch, fresh_plugins):
    _install_fake_distribution(tmp_path, monkeypatch, "lit-lowrank-typo", "typo = lit_lowrank_typo_mod", """
        from lit_lowrank import hookimpl

        @hookimpl
        def register_projector(register):  # missing "s": not a hook
            pass
    """)
    monkeypatch.delenv(fresh_plugins.DISABLE_ENTRYPOINTS_ENV)
    fresh_plugins.reset()
    with pytest.warns(RuntimeWarning, match="lit-lowrank-typo"):
        fresh_plugins.plugin_manager()
    assert fresh_plugins.plugin_manager().get_plugin("lit-lowrank-typo:typo") is None
    monkeypatch.setenv(fresh_plugins.DISABLE_ENTRYPOINTS_ENV, "1")
    sys.modules.pop("lit_lowrank_typo_mod", None)


def test_unknown_kind_is_an_error(fresh_plugins):
    with pytest.raises(ValueError, match="unknown component kind"):
        fresh_plugins.registered("optimisers")


class _Shadow(SVDProjector):
    pass


class _Other(SVDProjector):
    pass


def _plugin(name: str, cls: type):
    class Plugin:
        @hookimpl
        def register_projectors(self, register):
            register(name, cls)

    return Plugin()


def test_a_plugin_cannot_replace_a_builtin_name(fresh_plugins):
    fresh_plugins.register_plugin(_plugin("svd", _Shadow), name="lit-lowrank-shadow:shadow")
    with pytest.warns(RuntimeWarning, match="'svd' stays the built-in, the plugin's is 'lit-lowrank-shadow:svd'"):
        assert fresh_plugins.get_projector("svd") is SVDProjector
    assert fresh_plugins.get_projector("lit-lowrank-shadow:svd") is _Shadow
    registry = fresh_plugins.registered("projectors")
    assert registry["svd"].provider == "lit_lowrank.projectors.svd"
    assert registry["lit-lowrank-shadow:svd"].provider == "lit-lowrank-shadow:shadow"


def test_two_plugins_with_one_name_make_the_bare_name_ambiguous(fresh_plugins):
    fresh_plugins.register_plugin(_plugin("twin", _Shadow), name="pkg-a:a")
    fresh_plugins.register_plugin(_plugin("twin", _Other), name="pkg-b:b")
    with pytest.warns(RuntimeWarning, match="'twin' is registered by several plugins"):
        fresh_plugins.registered("projectors")
    with pytest.raises(lit_lowrank.UnknownComponentError, match="'twin' is registered by several plugins: "
                                                                 "pkg-a:twin, pkg-b:twin; name one of them"):
        fresh_plugins.get_projector("twin")
    assert fresh_plugins.get_projector("pkg-a:twin") is _Shadow
    assert fresh_plugins.get_projector("pkg-b:twin") is _Other


def test_a_plugin_component_is_also_reachable_by_package(fresh_plugins):
    fresh_plugins.register_plugin(_plugin("echo", _EchoProjector), name="lit-lowrank-echo:echo")
    assert fresh_plugins.get_projector("lit-lowrank-echo:echo") is _EchoProjector
    with pytest.raises(lit_lowrank.UnknownComponentError):
        fresh_plugins.get_projector("another-package:echo")


def test_plugins_command_lists_the_builtin_and_the_shadowing_plugin(fresh_plugins, capsys):
    from lit_lowrank.cli import main

    fresh_plugins.register_plugin(_plugin("svd", _Shadow), name="lit-lowrank-shadow:shadow")
    with pytest.warns(RuntimeWarning, match="stays the built-in"):
        main(["plugins"])
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split()[:2] == ["projectors", "svd"] and "SVDProjector" in line for line in lines)
    assert any(line.split()[:2] == ["projectors", "lit-lowrank-shadow:svd"] and "_Shadow" in line for line in lines)


def test_a_hook_failing_half_way_keeps_nothing(fresh_plugins):
    class HalfWay:
        @hookimpl
        def register_projectors(self, register):
            register("half-first", _EchoProjector)
            raise RuntimeError("second one needs libfoo")

    fresh_plugins.register_plugin(HalfWay(), name="half-way")
    with pytest.warns(RuntimeWarning, match="half-way.*libfoo.*skipped"):
        names = fresh_plugins.registered("projectors")
    assert "half-first" not in names and "svd" in names


def test_a_hook_calling_sys_exit_is_skipped(fresh_plugins):
    class Exiting:
        @hookimpl
        def register_projectors(self, register):
            register("exit-first", _EchoProjector)
            sys.exit(3)

    fresh_plugins.register_plugin(Exiting(), name="exiting")
    with pytest.warns(RuntimeWarning, match="exiting.*SystemExit"):
        names = fresh_plugins.registered("projectors")
    assert "exit-first" not in names and "svd" in names




def test_builtins_are_qualified_by_lit_lowrank(fresh_plugins):
    assert fresh_plugins.get_projector("lit_lowrank:svd") is SVDProjector
    assert fresh_plugins.qualified_name("projectors", "svd") == "lit_lowrank:svd"
    assert fresh_plugins.class_path(SVDProjector) == f"{SVDProjector.__module__}.{SVDProjector.__qualname__}"


def test_a_plugin_component_has_its_package_as_qualified_name(fresh_plugins):
    fresh_plugins.register_plugin(_plugin("echo", _EchoProjector), name="lit-lowrank-echo:echo")
    assert fresh_plugins.qualified_name("projectors", "echo") == "lit-lowrank-echo:echo"
    assert fresh_plugins.qualified_name("projectors", "lit-lowrank-echo:echo") == "lit-lowrank-echo:echo"


@pytest.mark.parametrize("claimed", ["pkg-a:twin", "lit_lowrank:svd2"])
def test_a_name_under_another_packages_prefix_is_refused(fresh_plugins, claimed):
    """A plugin cannot take `pkg:name` of another package (or of the built-ins): its hook is skipped,
    and the owner's qualified name keeps meaning the owner's class."""
    fresh_plugins.register_plugin(_plugin("twin", _Shadow), name="pkg-a:a")
    fresh_plugins.register_plugin(_plugin(claimed, _Other), name="pkg-evil:evil")
    with pytest.warns(RuntimeWarning, match=rf"'pkg-evil:evil' registered projector '{claimed}', a name qualified by "
                                            r"another package than its own \('pkg-evil'\)"):
        names = fresh_plugins.registered("projectors")
    assert claimed not in names
    assert fresh_plugins.get_projector("pkg-a:twin") is _Shadow


def test_a_name_under_its_own_prefix_is_registered(fresh_plugins):
    fresh_plugins.register_plugin(_plugin("pkg-a:own", _Other), name="pkg-a:a")
    assert fresh_plugins.get_projector("pkg-a:own") is _Other
    assert fresh_plugins.qualified_name("projectors", "pkg-a:own") == "pkg-a:own"
