"""Plugin discovery, VLLM_PLUGINS filtering, isolation of broken plugins, both plugin styles."""

from __future__ import annotations

import asyncio
import ast
import logging
import re
import sys
from pathlib import Path

import pytest

from loraplex.plugins import hookspecs, load_plugins, reset_plugins, resolver_order
from loraplex.plugins.loader import get_plugin_manager
from loraplex.plugins.selection import BUILTIN_PLUGINS, OPT_IN_PLUGINS, requested_plugins
from loraplex.resolvers import LoRAResolverRegistry, ResolverChain
from loraplex.resolvers.filesystem import FilesystemResolver
from loraplex.server.cli import main as cli_main
from plugin_helpers import add_callable_plugin, add_pluggy_plugin, fake_site, isolated_plugins  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
HUB = "lora_hf_hub_resolver"


def by_name(records):
    return {r.name: r for r in records}


def test_unset_loads_all_but_opt_in_builtins_first_then_by_name(fake_site):
    add_pluggy_plugin(fake_site, "zeta_plugin", {"zeta_res": {}})
    add_callable_plugin(fake_site, "alpha_plugin", {"alpha_res1": {}, "alpha_res2": {}})
    records = load_plugins()
    names = [r.name for r in records]
    builtins_seen = [n for n in names if n in BUILTIN_PLUGINS]
    assert builtins_seen[:2] == ["lora_filesystem_resolver", "lora_s3_resolver"]
    assert names.index("lora_s3_resolver") < names.index("alpha_plugin") < names.index("zeta_plugin")
    records = by_name(records)
    assert records["alpha_plugin"].loaded and records["alpha_plugin"].style == "callable"
    assert records["zeta_plugin"].loaded and records["zeta_plugin"].style == "pluggy"
    assert records["alpha_plugin"].resolvers == ["alpha_res1", "alpha_res2"]
    # The Hub plugin downloads from the internet: never loaded unless named.
    assert HUB in OPT_IN_PLUGINS
    assert not records[HUB].selected and "opt-in" in records[HUB].skip_reason
    assert [r for r, _ in resolver_order()] == ["alpha_res1", "alpha_res2", "zeta_res"]


def test_list_loads_only_those_in_that_order(fake_site, monkeypatch):
    add_pluggy_plugin(fake_site, "p_one", {"one": {}})
    add_pluggy_plugin(fake_site, "p_two", {"two": {}})
    add_callable_plugin(fake_site, "p_three", {"three": {}})
    monkeypatch.setenv("VLLM_PLUGINS", "p_three,p_one")
    records = load_plugins()
    assert [r.name for r in records if r.loaded] == ["p_three", "p_one"]
    skipped = by_name(records)
    assert not skipped["p_two"].selected and skipped["p_two"].skip_reason == "not listed in VLLM_PLUGINS"
    assert not skipped["lora_filesystem_resolver"].selected
    assert LoRAResolverRegistry.get_supported_resolvers() == ["three", "one"]
    assert ResolverChain.from_registry().resolver_names == ["three", "one"]


def test_whitespace_and_repeats_ignored(fake_site, monkeypatch):
    add_pluggy_plugin(fake_site, "p_a", {"a": {}})
    add_pluggy_plugin(fake_site, "p_b", {"b": {}})
    monkeypatch.setenv("VLLM_PLUGINS", "  p_b ,, p_a , p_b  ")
    assert requested_plugins() == ["p_b", "p_a"]
    assert [r.name for r in load_plugins() if r.loaded] == ["p_b", "p_a"]


def test_empty_string_loads_nothing(fake_site, monkeypatch):
    module = add_pluggy_plugin(fake_site, "p_a", {"a": {}})
    monkeypatch.setenv("VLLM_PLUGINS", "")
    records = load_plugins()
    assert records and not any(r.loaded or r.selected for r in records)
    assert LoRAResolverRegistry.get_supported_resolvers() == []
    assert module not in sys.modules


def test_unknown_name_warns_naming_installed(fake_site, monkeypatch, caplog):
    add_pluggy_plugin(fake_site, "p_real", {"real": {}})
    monkeypatch.setenv("VLLM_PLUGINS", "p_real,p_typo")
    with caplog.at_level(logging.WARNING):
        records = load_plugins()
    assert [r.name for r in records if r.loaded] == ["p_real"]
    warning = next(r.getMessage() for r in caplog.records if "p_typo" in r.getMessage())
    assert "not installed" in warning and "p_real" in warning and "lora_filesystem_resolver" in warning


def test_opt_in_plugin_is_selected_when_named(fake_site, monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", HUB)
    record = by_name(load_plugins())[HUB]
    assert record.selected and record.skip_reason is None


BROKEN = {
    "import_error": "import nonexistent_module_for_loraplex_tests\n",
    "raising_hook": """
        from loraplex.plugins import hookimpl
        from loraplex.resolvers import LoRAResolver

        class R(LoRAResolver):
            async def resolve_lora(self, base_model_name, lora_name):
                return None

        @hookimpl
        def register_lora_resolvers(register):
            register("half_registered", R())
            raise RuntimeError("bucket URI is malformed")
        """,
    "typo_hook": """
        from loraplex.plugins import hookimpl

        @hookimpl
        def register_lora_resolver(register):
            pass
        """,
    "not_a_resolver": """
        from loraplex.plugins import hookimpl

        @hookimpl
        def register_lora_resolvers(register):
            register("bad", object())
        """,
    "raising_callable": """
        def register():
            raise ValueError("index file missing")
        """,
}
EXPECTED_ERROR = {
    "import_error": "ModuleNotFoundError",
    "raising_hook": "RuntimeError: bucket URI is malformed",
    "typo_hook": "unknown hook(s) register_lora_resolver",
    "not_a_resolver": "must be a LoRAResolver instance",
    "raising_callable": "ValueError: index file missing",
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_plugin_does_not_take_others_down(fake_site, kind, caplog):
    module = fake_site.module_name(kind)
    fake_site.add_module(module, BROKEN[kind])
    target = f"{module}:register" if kind == "raising_callable" else module
    fake_site.add_distribution(f"dist_{module}", {"broken_plugin": target})
    add_pluggy_plugin(fake_site, "good_plugin", {"good": {"x": "/adapters/x"}})
    with caplog.at_level(logging.ERROR):
        records = by_name(load_plugins())
    broken = records["broken_plugin"]
    assert not broken.loaded and broken.resolvers == []
    assert EXPECTED_ERROR[kind] in broken.error
    assert records["good_plugin"].loaded
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "broken_plugin" in logged and EXPECTED_ERROR[kind] in logged
    # Partial registrations of the broken plugin are rolled back.
    assert LoRAResolverRegistry.get_supported_resolvers() == ["good"]
    assert ResolverChain.from_registry().resolver_names == ["good"]


def test_broken_plugin_that_replaced_a_name_gives_it_back(fake_site, monkeypatch):
    add_pluggy_plugin(fake_site, "p_good", {"shared": {"a": "/good/a"}})
    module = fake_site.module_name("replacer")
    fake_site.add_module(module, """
        from loraplex.lora_request import LoRARequest
        from loraplex.resolvers import LoRAResolver, LoRAResolverRegistry

        class R(LoRAResolver):
            async def resolve_lora(self, base_model_name, lora_name):
                return LoRARequest(lora_name, 1, "/broken/" + lora_name)

        def register():
            LoRAResolverRegistry.register_resolver("shared", R())
            raise RuntimeError("half-way through")
        """)
    fake_site.add_distribution(f"dist_{module}", {"p_broken": f"{module}:register"})
    monkeypatch.setenv("VLLM_PLUGINS", "p_good,p_broken")
    records = by_name(load_plugins())
    assert not records["p_broken"].loaded and records["p_good"].resolvers == ["shared"]
    request = asyncio.run(ResolverChain.from_registry().resolve("base", "a"))
    assert request.lora_path == "/good/a"


def test_entry_point_that_is_neither_style_is_reported(fake_site):
    module = fake_site.module_name("constant")
    fake_site.add_module(module, "VALUE = 3\n")
    fake_site.add_distribution(f"dist_{module}", {"odd_plugin": f"{module}:VALUE"})
    record = by_name(load_plugins())["odd_plugin"]
    assert not record.loaded and "neither a pluggy plugin" in record.error


def test_object_with_hookimpl_methods_is_a_pluggy_plugin(fake_site):
    module = fake_site.module_name("obj_plugin")
    fake_site.add_module(module, """
        from loraplex.plugins import hookimpl
        from loraplex.resolvers import LoRAResolver

        class R(LoRAResolver):
            async def resolve_lora(self, base_model_name, lora_name):
                return None

        class Plugin:
            @hookimpl
            def register_lora_resolvers(self, register):
                register("from_object", R())

        plugin = Plugin()
        """)
    fake_site.add_distribution(f"dist_{module}", {"obj_plugin": f"{module}:plugin"})
    record = by_name(load_plugins())["obj_plugin"]
    assert record.loaded and record.style == "pluggy" and record.resolvers == ["from_object"]
    assert get_plugin_manager().get_plugin("obj_plugin") is sys.modules[module].plugin


def test_load_is_idempotent_and_reset_starts_over(fake_site):
    pluggy_module = add_pluggy_plugin(fake_site, "p_hook", {"hooked": {}})
    callable_module = add_callable_plugin(fake_site, "p_call", {"called": {}})
    first = load_plugins()
    assert load_plugins() is first
    ResolverChain.from_registry()
    assert len(sys.modules[pluggy_module].CALLS) == 1 and len(sys.modules[callable_module].CALLS) == 1
    reset_plugins()
    assert LoRAResolverRegistry.get_supported_resolvers() == []
    load_plugins()
    assert len(sys.modules[pluggy_module].CALLS) == 2
    assert set(LoRAResolverRegistry.get_supported_resolvers()) == {"hooked", "called"}


def test_name_clash_later_plugin_owns_the_name(fake_site, monkeypatch, caplog):
    add_pluggy_plugin(fake_site, "p_first", {"shared": {"a": "/first/a"}, "own": {}})
    add_callable_plugin(fake_site, "p_second", {"shared": {"a": "/second/a"}})
    monkeypatch.setenv("VLLM_PLUGINS", "p_first,p_second")
    with caplog.at_level(logging.WARNING):
        records = by_name(load_plugins())
    assert "already registered" in caplog.text
    assert records["p_first"].resolvers == ["own"] and records["p_second"].resolvers == ["shared"]
    assert resolver_order() == [("own", "p_first"), ("shared", "p_second")]


def test_resolvers_registered_outside_plugins_come_last(fake_site, monkeypatch):
    add_pluggy_plugin(fake_site, "p_plug", {"plugged": {}})
    LoRAResolverRegistry.register_resolver("direct", FilesystemResolver(fake_site.root))
    monkeypatch.setenv("VLLM_PLUGINS", "p_plug")
    assert resolver_order() == [("plugged", "p_plug"), ("direct", None)]


def test_cli_lists_plugins_status_and_chain(fake_site, monkeypatch, capsys):
    add_pluggy_plugin(fake_site, "p_ok", {"ok_res": {}})
    module = fake_site.module_name("bad")
    fake_site.add_module(module, "raise ImportError('needs libfoo')\n")
    fake_site.add_distribution(f"dist_{module}", {"p_bad": module})
    monkeypatch.setenv("VLLM_PLUGINS", "p_bad,p_ok")
    assert cli_main(["plugins"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"p_bad\s+error\s+import of .* failed: ImportError: needs libfoo", out)
    assert re.search(r"p_ok\s+loaded\s+resolvers: ok_res", out)
    assert re.search(r"lora_filesystem_resolver\s+skipped\s+not listed in VLLM_PLUGINS", out)
    assert "1. ok_res  (plugin p_ok)" in out


def test_cli_exit_zero_when_all_selected_plugins_load(fake_site, monkeypatch, capsys):
    add_pluggy_plugin(fake_site, "p_ok", {"ok_res": {}})
    monkeypatch.setenv("VLLM_PLUGINS", "p_ok")
    assert cli_main(["plugins", "--json"]) == 0
    assert '"resolver": "ok_res"' in capsys.readouterr().out


def test_every_hookspec_is_documented():
    """Each hook has a full docstring and a '## <hook>' heading in docs/plugins.md."""
    tree = ast.parse(Path(hookspecs.__file__).read_text())
    hooks = [node for node in tree.body if isinstance(node, ast.FunctionDef)
             and any(getattr(d, "id", None) == "hookspec" for d in node.decorator_list)]
    assert "register_lora_resolvers" in [h.name for h in hooks]
    doc = (REPO / "docs" / "plugins.md").read_text()
    headings = set(re.findall(r"^#+\s+`?(\w+)`?", doc, flags=re.MULTILINE))
    for hook in hooks:
        docstring = ast.get_docstring(hook) or ""
        assert len(docstring.split()) >= 20, f"hook {hook.name} needs a full docstring"
        assert hook.name in headings, f"docs/plugins.md has no heading for hook {hook.name}"
