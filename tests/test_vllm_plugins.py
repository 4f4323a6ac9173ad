"""Plugins written for vLLM (entry point group vllm.general_plugins, `vllm.*` imports) load
unchanged: their vllm imports get loraplex's objects while they load, VLLM_PLUGINS filters
them, and a real vllm installation is never shadowed."""

from __future__ import annotations

import asyncio
import json
import logging
import sys

import pytest

from adapters import write_peft_adapter
from loraplex.lora_request import LoRARequest
from loraplex.plugins import load_plugins, reset_plugins
from loraplex.plugins.vllm_compat import VLLM_ENTRY_POINT_GROUP
from loraplex.resolvers import LoRAResolver, LoRAResolverRegistry, ResolverChain
from loraplex.server.cli import main as cli_main
from plugin_helpers import add_callable_plugin, fake_site, isolated_plugins  # noqa: F401

# A resolver package exactly as vLLM's docs describe one; `vllm.lora.request` is imported
# again inside resolve_lora, after loading, as plugins that import lazily do.
VLLM_PLUGIN = '''
import os

import vllm.envs as envs
from vllm.logger import init_logger
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

logger = init_logger(__name__)


class DirResolver(LoRAResolver):
    def __init__(self, root):
        self.root = root

    async def resolve_lora(self, base_model_name, lora_name):
        from vllm.lora.request import LoRARequest
        path = os.path.join(self.root, lora_name)
        if not os.path.isdir(path):
            return None
        logger.warning_once("serving %s from %s", lora_name, path)
        return LoRARequest(lora_name=lora_name, lora_path=path, lora_int_id=abs(hash(lora_name)))


def register():
    root = os.environ.get("DIR_RESOLVER_ROOT")
    if root and envs.VLLM_PLUGINS is not None:   # vLLM's envs: read at attribute access
        LoRAResolverRegistry.register_resolver("Dir Resolver", DirResolver(root))
'''


def add_vllm_plugin(site, plugin_name, source=VLLM_PLUGIN, attr="register"):
    module = site.module_name(plugin_name)
    site.add_module(module, source)
    site.add_distribution(f"dist_{module}", {plugin_name: f"{module}:{attr}"}, group=VLLM_ENTRY_POINT_GROUP)
    return module


def by_name(records, name):
    [record] = [r for r in records if r.name == name]
    return record


@pytest.fixture
def adapters(tmp_path):
    root = tmp_path / "adapters"
    write_peft_adapter(root / "sql-lora")
    return root


def test_vllm_plugin_loads_and_resolves_through_the_chain(fake_site, monkeypatch, adapters):
    add_vllm_plugin(fake_site, "dir_resolver")
    monkeypatch.setenv("DIR_RESOLVER_ROOT", str(adapters))
    monkeypatch.setenv("VLLM_PLUGINS", "dir_resolver")
    record = by_name(load_plugins(), "dir_resolver")
    assert record.loaded and record.group == VLLM_ENTRY_POINT_GROUP and record.resolvers == ["Dir Resolver"]
    resolver = LoRAResolverRegistry.get_resolver("Dir Resolver")
    assert isinstance(resolver, LoRAResolver)   # loraplex's class, not a copy
    # The hook is gone; the stand-in modules stay for the plugin's lazy imports.
    assert not any(type(f).__name__ == "_VllmFinder" for f in sys.meta_path)
    assert vars(sys.modules["vllm.lora.request"])["LoRARequest"] is LoRARequest
    chain = ResolverChain.from_registry()
    request = asyncio.run(chain.resolve("tiny-base", "sql-lora"))
    assert isinstance(request, LoRARequest) and request.lora_path == str(adapters / "sql-lora")
    assert asyncio.run(chain.resolve("tiny-base", "missing")) is None


def test_vllm_plugins_filters_both_groups(fake_site, monkeypatch, adapters):
    add_vllm_plugin(fake_site, "dir_resolver")
    add_callable_plugin(fake_site, "ours", {"ours": {}})
    monkeypatch.setenv("DIR_RESOLVER_ROOT", str(adapters))
    monkeypatch.setenv("VLLM_PLUGINS", "ours")
    records = {r.name: r for r in load_plugins()}
    assert records["ours"].loaded and not records["dir_resolver"].selected
    assert records["dir_resolver"].skip_reason == "not listed in VLLM_PLUGINS"
    assert "vllm" not in sys.modules   # nothing mapped when no vLLM plugin loaded
    reset_plugins()
    monkeypatch.setenv("VLLM_PLUGINS", "")
    assert not any(r.loaded for r in load_plugins())
    reset_plugins()
    monkeypatch.delenv("VLLM_PLUGINS")
    records = {r.name: r for r in load_plugins()}
    # Unset: everything loads. vLLM's own envs.VLLM_PLUGINS is None then, so this plugin
    # registers nothing, exactly as it would under vLLM.
    assert records["dir_resolver"].loaded and records["dir_resolver"].resolvers == []
    assert records["ours"].loaded


def test_same_name_in_both_groups_takes_loraplex(fake_site, monkeypatch, adapters):
    add_vllm_plugin(fake_site, "twin")
    add_callable_plugin(fake_site, "twin", {"ours_twin": {}})
    monkeypatch.setenv("DIR_RESOLVER_ROOT", str(adapters))
    records = [r for r in load_plugins() if r.name == "twin"]
    loaded = [r for r in records if r.loaded]
    shadowed = [r for r in records if r.group == VLLM_ENTRY_POINT_GROUP]
    assert [(r.group, r.resolvers) for r in loaded] == [("loraplex.plugins", ["ours_twin"])]
    assert len(shadowed) == 1 and "group 'loraplex.plugins' is used instead" in shadowed[0].skip_reason


@pytest.mark.parametrize("source, expected", [
    ("from vllm.config import ModelConfig\ndef register(): pass\n",
     "No module named 'vllm.config'.*only vllm.envs, vllm.logger, vllm.lora.request, vllm.lora.resolver"),
    ("from vllm import ModelRegistry\ndef register(): pass\n",
     "cannot import name 'ModelRegistry'.*a vLLM plugin: loraplex provides vllm.lora.resolver"),
])
def test_plugin_needing_more_of_vllm_is_a_clear_error(fake_site, monkeypatch, caplog, source, expected):
    add_vllm_plugin(fake_site, "model_plugin", source=source)
    with caplog.at_level(logging.ERROR):
        record = by_name(load_plugins(), "model_plugin")
    assert not record.loaded and record.error
    assert __import__("re").search(expected, record.error), record.error
    assert "model_plugin" in caplog.text
    assert "vllm" not in sys.modules


@pytest.fixture
def real_vllm(fake_site):
    """An importable package named vllm, standing for a real vLLM installation."""
    package = fake_site.root / "vllm"
    package.mkdir()
    (package / "__init__.py").write_text("REAL = True\n")
    yield
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        del sys.modules[name]


def test_installed_vllm_is_never_shadowed(fake_site, real_vllm, monkeypatch, adapters, caplog):
    add_vllm_plugin(fake_site, "dir_resolver")
    monkeypatch.setenv("DIR_RESOLVER_ROOT", str(adapters))
    with caplog.at_level(logging.WARNING):
        record = by_name(load_plugins(), "dir_resolver")
    assert not record.loaded and not record.selected and record.error is None
    assert record.skip_reason.startswith("not adapted: it is a vLLM plugin") and "vllm package is installed" \
        in record.skip_reason
    assert "dir_resolver" in caplog.text
    import vllm
    assert vllm.REAL
    # Named in VLLM_PLUGINS: the user asked for it, so it is an error (`loraplex plugins` exits 1).
    reset_plugins()
    monkeypatch.setenv("VLLM_PLUGINS", "dir_resolver")
    record = by_name(load_plugins(), "dir_resolver")
    assert record.error.startswith("not adapted") and not record.loaded
    assert cli_main(["plugins"]) == 1


def test_stand_in_envs_follow_vllm(fake_site, monkeypatch):
    source = ('import vllm.envs as envs\nSEEN = {}\n'
              'def register():\n'
              '    SEEN.update(plugins=envs.VLLM_PLUGINS, runtime=envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING,\n'
              '                cache=envs.VLLM_LORA_RESOLVER_CACHE_DIR, is_set=envs.is_set("VLLM_PLUGINS"))\n'
              '    try:\n'
              '        envs.VLLM_NOT_A_VARIABLE\n'
              '    except AttributeError as e:\n'
              '        SEEN["unknown"] = str(e)\n')
    module = add_vllm_plugin(fake_site, "envs_probe", source=source)
    monkeypatch.setenv("VLLM_PLUGINS", "envs_probe, other")   # vLLM keeps the space: " other"
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    record = by_name(load_plugins(), "envs_probe")
    assert record.loaded, record.error
    seen = sys.modules[module].SEEN
    assert seen["plugins"] == ["envs_probe", " other"] and seen["runtime"] is True
    assert seen["cache"] is None and seen["is_set"] is True
    assert "has no 'VLLM_NOT_A_VARIABLE'" in seen["unknown"]


def test_reset_drops_the_stand_in_modules(fake_site, monkeypatch, adapters):
    add_vllm_plugin(fake_site, "dir_resolver")
    monkeypatch.setenv("DIR_RESOLVER_ROOT", str(adapters))
    monkeypatch.setenv("VLLM_PLUGINS", "dir_resolver")
    assert by_name(load_plugins(), "dir_resolver").loaded and "vllm.envs" in sys.modules
    reset_plugins()
    assert not [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]


def test_cli_reports_each_plugins_group(fake_site, monkeypatch, adapters, capsys):
    add_vllm_plugin(fake_site, "dir_resolver")
    monkeypatch.setenv("DIR_RESOLVER_ROOT", str(adapters))
    monkeypatch.setenv("VLLM_PLUGINS", "dir_resolver,lora_filesystem_resolver")
    assert cli_main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert f"group {VLLM_ENTRY_POINT_GROUP}" in out and "group loraplex.plugins" in out
    assert "1. Dir Resolver  (plugin dir_resolver)" in out
    reset_plugins()
    assert cli_main(["plugins", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {p["name"]: p["group"] for p in report["plugins"]}["dir_resolver"] == VLLM_ENTRY_POINT_GROUP
