"""The example third-party package, installed for real (pip --target) and used from
fresh processes: discovered, filtered by VLLM_PLUGINS, and resolving."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adapters import write_peft_adapter
from plugin_helpers import pip_install

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "loraplex-example-resolver"
LORAPLEX = Path(sys.executable).parent / "loraplex"
PLUGIN = "example_index_resolver"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The example installed into a private target dir (the shared venv stays clean)."""
    target = pip_install(EXAMPLE, tmp_path_factory.mktemp("example"))
    assert (target / "loraplex_example_resolver" / "resolver.py").is_file()
    return target


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    write_peft_adapter(root / "sql-lora", rank=4)
    write_peft_adapter(root / "elsewhere" / "chat")
    broken = write_peft_adapter(root / "broken")
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    index_path = root / "index.json"
    index_path.write_text(json.dumps({"sql-lora": "sql-lora", "acme/chat": str(root / "elsewhere" / "chat"),
                                      "broken": "broken"}))
    return index_path


def run_in(site, *args, **env_vars):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "LORAPLEX_"))}
    env["PYTHONPATH"] = str(site)
    env.update(env_vars)
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)


def plugins_report(site, **env_vars):
    proc = run_in(site, str(LORAPLEX), "plugins", "--json", **env_vars)
    report = json.loads(proc.stdout)
    return proc, report, {p["name"]: p for p in report["plugins"]}


def test_discovered_with_vllm_plugins_unset(site, index):
    proc, report, plugins = plugins_report(site, LORAPLEX_EXAMPLE_INDEX=str(index))
    example = plugins[PLUGIN]
    assert example["loaded"] and example["style"] == "callable"
    assert example["distribution"] == "loraplex-example-resolver"
    assert example["target"] == "loraplex_example_resolver:register"
    assert example["resolvers"] == [PLUGIN]
    assert {"resolver": PLUGIN, "plugin": PLUGIN} in report["chain"]
    # Built-ins come first when VLLM_PLUGINS is unset.
    names = [p["name"] for p in report["plugins"]]
    assert names.index("lora_filesystem_resolver") < names.index(PLUGIN)


def test_filtered_by_vllm_plugins(site, index, tmp_path):
    proc, report, plugins = plugins_report(site, LORAPLEX_EXAMPLE_INDEX=str(index),
                                           VLLM_PLUGINS="lora_filesystem_resolver")
    assert not plugins[PLUGIN]["selected"] and plugins[PLUGIN]["skip_reason"] == "not listed in VLLM_PLUGINS"
    assert PLUGIN not in [c["resolver"] for c in report["chain"]]

    proc = run_in(site, str(LORAPLEX), "plugins", LORAPLEX_EXAMPLE_INDEX=str(index),
                  VLLM_LORA_RESOLVER_CACHE_DIR=str(tmp_path),
                  VLLM_PLUGINS=f" {PLUGIN} , lora_filesystem_resolver ")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    chain = lines[lines.index("Resolver chain (tried in this order):") + 1:]
    assert chain == [f"  1. {PLUGIN}  (plugin {PLUGIN})",
                     "  2. lora_filesystem_resolver  (plugin lora_filesystem_resolver)"]


def test_unconfigured_registers_nothing_and_bad_config_is_reported(site, tmp_path):
    proc, report, plugins = plugins_report(site, VLLM_PLUGINS=PLUGIN)
    assert proc.returncode == 0 and plugins[PLUGIN]["loaded"] and plugins[PLUGIN]["resolvers"] == []
    proc, report, plugins = plugins_report(site, VLLM_PLUGINS=PLUGIN,
                                           LORAPLEX_EXAMPLE_INDEX=str(tmp_path / "missing.json"))
    assert proc.returncode == 1
    assert "LORAPLEX_EXAMPLE_INDEX" in plugins[PLUGIN]["error"]
    assert PLUGIN in proc.stderr  # logged with the plugin's name


RESOLVE_SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    from loraplex.errors import AdapterInvalidError
    from loraplex.resolvers import ResolverChain

    async def main():
        chain = ResolverChain.from_registry()
        out = {"chain": chain.resolver_names}
        for name in sys.argv[1:]:
            try:
                req = await chain.resolve("tiny-base", name)
                out[name] = None if req is None else [req.lora_path, req.lora_int_id]
            except AdapterInvalidError as e:
                out[name] = "invalid: " + str(e)
        print(json.dumps(out))

    asyncio.run(main())
""")


def test_resolves_through_the_chain(site, index):
    proc = run_in(site, sys.executable, "-c", RESOLVE_SCRIPT, "sql-lora", "acme/chat", "missing", "broken",
                  LORAPLEX_EXAMPLE_INDEX=str(index), VLLM_PLUGINS=PLUGIN)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    from loraplex.lora_request import lora_id_for_name
    assert out["chain"] == [PLUGIN]
    assert out["sql-lora"] == [str(index.parent / "sql-lora"), lora_id_for_name("sql-lora")]
    assert out["acme/chat"][0] == str(index.parent / "elsewhere" / "chat")
    assert out["missing"] is None
    assert out["broken"].startswith("invalid: ") and "not a safetensors file" in out["broken"]
