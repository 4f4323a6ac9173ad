"""Fixtures for plugin tests: isolated plugin/registry state, and installed-looking
fake distributions (a real *.dist-info with entry_points.txt on sys.path, so
importlib.metadata discovers them exactly as it discovers pip-installed packages)."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from loraplex.plugins import reset_plugins
from loraplex.resolvers import LoRAResolverRegistry

# Every variable a plugin or resolver reads (the built-ins' and the example's).
RESOLVER_ENV_PREFIXES = ("VLLM_PLUGINS", "VLLM_LORA_RESOLVER_", "LORAPLEX_RESOLVER_",
                         "LORAPLEX_ALLOW_PICKLE_LORA_WEIGHTS", "LORAPLEX_EXAMPLE_")
_unique = itertools.count()


@pytest.fixture
def isolated_plugins(monkeypatch):
    """No plugins loaded, an empty registry and none of our env vars set, before and after."""
    for name in [n for n in os.environ if n.startswith(RESOLVER_ENV_PREFIXES)]:
        monkeypatch.delenv(name)
    reset_plugins()
    LoRAResolverRegistry.clear()
    yield
    reset_plugins()
    LoRAResolverRegistry.clear()


class FakeSite:
    """A directory on sys.path holding fake installed distributions and their modules."""

    def __init__(self, root: Path, monkeypatch) -> None:
        self.root = root
        self.modules: list[str] = []
        root.mkdir(parents=True, exist_ok=True)
        monkeypatch.syspath_prepend(str(root))

    def module_name(self, stem: str) -> str:
        """A module name no other test has imported (sys.modules outlives tests)."""
        name = f"{stem}_{next(_unique)}"
        self.modules.append(name)
        return name

    def add_module(self, name: str, source: str) -> None:
        (self.root / f"{name}.py").write_text(textwrap.dedent(source))

    def add_distribution(self, dist_name: str, entry_points: dict[str, str],
                         group: str = "loraplex.plugins") -> None:
        """Declare `entry_points` (plugin name -> "module[:attr]") in `group`."""
        info = self.root / f"{dist_name}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 1.0\n")
        lines = [f"[{group}]"] + [f"{k} = {v}" for k, v in entry_points.items()]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")

    def cleanup(self) -> None:
        for name in self.modules:
            sys.modules.pop(name, None)


@pytest.fixture
def fake_site(tmp_path, monkeypatch, isolated_plugins):
    site = FakeSite(tmp_path / "site", monkeypatch)
    yield site
    site.cleanup()


# The resolver both plugin styles register: it answers only for the names listed in it
# (a real LoRAResolver, not a mock).
STATIC_RESOLVER = '''
from loraplex.lora_request import LoRARequest, lora_id_for_name
from loraplex.resolvers import LoRAResolver, LoRAResolverRegistry

CALLS = []


class StaticResolver(LoRAResolver):
    def __init__(self, adapters):
        self.adapters = adapters

    async def resolve_lora(self, base_model_name, lora_name):
        path = self.adapters.get(lora_name)
        return LoRARequest(lora_name, lora_id_for_name(lora_name), path) if path else None
'''

# A pluggy plugin module registering the resolvers named in RESOLVERS.
PLUGGY_MODULE = STATIC_RESOLVER + '''
from loraplex.plugins import hookimpl

RESOLVERS = {resolvers!r}


@hookimpl
def register_lora_resolvers(register):
    CALLS.append(1)
    for name, adapters in RESOLVERS.items():
        register(name, StaticResolver(adapters))
'''

# The vLLM style: a zero-argument callable that uses the registry itself.
CALLABLE_MODULE = STATIC_RESOLVER + '''

def register():
    CALLS.append(1)
    for name, adapters in {resolvers!r}.items():
        LoRAResolverRegistry.register_resolver(name, StaticResolver(adapters))
'''


def add_pluggy_plugin(site: FakeSite, plugin_name: str, resolvers: dict[str, dict[str, str]]) -> str:
    module = site.module_name(plugin_name)
    site.add_module(module, PLUGGY_MODULE.format(resolvers=resolvers))
    site.add_distribution(f"dist_{module}", {plugin_name: module})
    return module


def add_callable_plugin(site: FakeSite, plugin_name: str, resolvers: dict[str, dict[str, str]]) -> str:
    module = site.module_name(plugin_name)
    site.add_module(module, CALLABLE_MODULE.format(resolvers=resolvers))
    site.add_distribution(f"dist_{module}", {plugin_name: f"{module}:register"})
    return module


def pip_install(package_dir: Path, work: Path) -> Path:
    """Install the package in `package_dir` with pip into `work/site` (the shared venv stays
    clean) and return that directory, to put on PYTHONPATH."""
    source = work / "src"
    shutil.copytree(package_dir, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, timeout=300)
    return target
