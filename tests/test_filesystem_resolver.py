"""The filesystem resolver: VLLM_LORA_RESOLVER_CACHE_DIR/<name>/ holding a PEFT LoRA adapter."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from adapters import write_peft_adapter
from loraplex.errors import AdapterInvalidError, AdapterNameError, ConfigError
from loraplex.lora_request import lora_id_for_name
from loraplex.plugins import load_plugins
from loraplex.resolvers import LoRAResolverRegistry, ResolverChain
from loraplex.resolvers.filesystem import PLUGIN_NAME, FilesystemResolver
from loraplex.server.cli import main as cli_main
from plugin_helpers import isolated_plugins  # noqa: F401
from test_names import HOSTILE_NAMES

BASE = "tiny-base"


def resolve(resolver, name, base=BASE):
    return asyncio.run(resolver.resolve_lora(base, name))


@pytest.fixture
def lora_dir(tmp_path):
    root = tmp_path / "loras"
    root.mkdir()
    return root


def test_found_adapter_points_at_its_directory(lora_dir):
    adapter = write_peft_adapter(lora_dir / "sql-lora", rank=4)
    request = resolve(FilesystemResolver(lora_dir), "sql-lora")
    assert request.lora_name == "sql-lora" and request.lora_int_id == lora_id_for_name("sql-lora")
    assert request.lora_path == str(adapter) and request.base_model_name == BASE
    # The directory is a real PEFT adapter: peft itself reads it back.
    from peft import LoraConfig
    config = LoraConfig.from_pretrained(request.lora_path)
    assert config.r == 4 and set(config.target_modules) == {"q_proj", "v_proj"}


def test_org_slash_name_is_a_nested_directory(lora_dir):
    write_peft_adapter(lora_dir / "acme" / "sql-lora")
    assert resolve(FilesystemResolver(lora_dir), "acme/sql-lora").lora_path == str(lora_dir / "acme" / "sql-lora")


def test_unknown_name_is_not_found(lora_dir):
    assert resolve(FilesystemResolver(lora_dir), "nope") is None


@pytest.mark.parametrize("name", [n for n in HOSTILE_NAMES if isinstance(n, str) and n])
def test_hostile_names_rejected(tmp_path, name):
    # An adapter outside the cache dir that a traversal would reach.
    write_peft_adapter(tmp_path / "etc")
    root = tmp_path / "loras" / "inner"
    root.mkdir(parents=True)
    with pytest.raises(AdapterNameError):
        resolve(FilesystemResolver(root), name)


def _break(adapter, how):
    config_path = adapter / "adapter_config.json"
    weights = adapter / "adapter_model.safetensors"
    if how == "config_not_json":
        config_path.write_text("{not json")
    elif how == "config_not_object":
        config_path.write_text("[1, 2]")
    elif how == "config_missing":
        config_path.unlink()
    elif how == "not_lora":
        config = json.loads(config_path.read_text())
        config["peft_type"] = "IA3"
        config_path.write_text(json.dumps(config))
    elif how == "weights_missing":
        weights.unlink()
    elif how == "weights_truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif how == "weights_not_safetensors":
        weights.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    elif how == "weights_empty":
        weights.write_bytes(b"")


BREAKAGES = {
    "config_not_json": "is not valid JSON",
    "config_not_object": "must hold a JSON object",
    "weights_missing": "has no weights file",
    "weights_truncated": "truncated",
    "weights_not_safetensors": "not a safetensors file",
    "weights_empty": "truncated",
}


@pytest.mark.parametrize("how", sorted(BREAKAGES))
def test_found_but_invalid_names_the_reason(lora_dir, how):
    _break(write_peft_adapter(lora_dir / "broken"), how)
    with pytest.raises(AdapterInvalidError, match=BREAKAGES[how]):
        resolve(FilesystemResolver(lora_dir), "broken")


# Not this resolver's adapter (vLLM's rule): None, and the chain says why if nothing else finds it.
NOT_MINE = {
    "config_missing": "'broken' is a directory without adapter_config.json, not a PEFT adapter",
    "not_lora": "peft_type 'IA3'; only 'LORA' adapters are supported",
}


@pytest.mark.parametrize("how", sorted(NOT_MINE))
def test_not_a_lora_adapter_is_not_mine(lora_dir, how):
    _break(write_peft_adapter(lora_dir / "broken"), how)
    assert resolve(FilesystemResolver(lora_dir), "broken") is None
    chain = ResolverChain([("fs", FilesystemResolver(lora_dir))])
    with pytest.raises(AdapterInvalidError, match=f"no resolver found a usable LoRA adapter named 'broken'.*"
                                                  f"fs: .*{NOT_MINE[how]}"):
        asyncio.run(chain.resolve(BASE, "broken"))


def _pickle_only_adapter(path):
    adapter = write_peft_adapter(path)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    torch.save(tensors, adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    return adapter


def test_pickle_weights_refused_unless_allowed(lora_dir, monkeypatch):
    adapter = _pickle_only_adapter(lora_dir / "old")
    monkeypatch.delenv("LORAPLEX_ALLOW_PICKLE_LORA_WEIGHTS", raising=False)
    with pytest.raises(AdapterInvalidError, match="LORAPLEX_ALLOW_PICKLE_LORA_WEIGHTS"):
        resolve(FilesystemResolver(lora_dir), "old")
    monkeypatch.setenv("LORAPLEX_ALLOW_PICKLE_LORA_WEIGHTS", "1")
    assert resolve(FilesystemResolver(lora_dir), "old").lora_path == str(adapter)
    monkeypatch.setenv("LORAPLEX_ALLOW_PICKLE_LORA_WEIGHTS", "maybe")
    with pytest.raises(ConfigError, match="LORAPLEX_ALLOW_PICKLE_LORA_WEIGHTS"):
        FilesystemResolver(lora_dir)


@pytest.mark.parametrize("adapter_base,served", [
    ("tiny-base", "tiny-base"),
    ("/models/tiny-base", "/models/tiny-base/"),
    ("acme/tiny-base", "/srv/models/tiny-base"),
])
def test_compatible_base_models_accepted(lora_dir, adapter_base, served):
    write_peft_adapter(lora_dir / "a", base_model_name_or_path=adapter_base)
    assert resolve(FilesystemResolver(lora_dir), "a", base=served) is not None


def test_base_model_mismatch_is_not_mine(lora_dir):
    write_peft_adapter(lora_dir / "a", base_model_name_or_path="meta-llama/Llama-3-70B")
    assert resolve(FilesystemResolver(lora_dir), "a") is None
    chain = ResolverChain([("fs", FilesystemResolver(lora_dir))])
    with pytest.raises(AdapterInvalidError, match="fs: adapter 'a' was trained on 'meta-llama/Llama-3-70B'"
                                                  ".*'tiny-base'"):
        asyncio.run(chain.resolve(BASE, "a"))


def test_empty_base_model_accepted(lora_dir, caplog):
    # Served unchecked; the warning is the load's, once (test_lora_adapter.py), not every resolve's.
    write_peft_adapter(lora_dir / "a", base_model_name_or_path="")
    with caplog.at_level(logging.WARNING):
        assert resolve(FilesystemResolver(lora_dir), "a") is not None
    assert "base_model_name_or_path is empty" not in caplog.text


# Registration through the real entry point of the installed package.

def test_unset_variable_registers_nothing(isolated_plugins, monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", PLUGIN_NAME)
    record = load_plugins()[0]
    assert record.name == PLUGIN_NAME and record.loaded and record.resolvers == []


def test_set_variable_registers_and_resolves_through_chain(isolated_plugins, monkeypatch, lora_dir):
    write_peft_adapter(lora_dir / "sql-lora")
    monkeypatch.setenv("VLLM_PLUGINS", PLUGIN_NAME)
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", str(lora_dir))
    chain = ResolverChain.from_registry()
    assert chain.resolver_names == [PLUGIN_NAME]
    assert isinstance(LoRAResolverRegistry.get_resolver(PLUGIN_NAME), FilesystemResolver)
    assert asyncio.run(chain.resolve(BASE, "sql-lora")).lora_path == str(lora_dir / "sql-lora")
    assert asyncio.run(chain.resolve(BASE, "missing")) is None


def test_missing_directory_is_a_loud_startup_error(isolated_plugins, monkeypatch, tmp_path, caplog, capsys):
    monkeypatch.setenv("VLLM_PLUGINS", PLUGIN_NAME)
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", str(tmp_path / "typo"))
    with caplog.at_level(logging.ERROR):
        record = load_plugins()[0]
    assert not record.loaded and "ConfigError" in record.error
    assert "VLLM_LORA_RESOLVER_CACHE_DIR" in record.error and "typo" in record.error
    assert PLUGIN_NAME in caplog.text and "VLLM_LORA_RESOLVER_CACHE_DIR" in caplog.text
    assert cli_main(["plugins"]) == 1
    out = capsys.readouterr().out
    assert "error" in out and "VLLM_LORA_RESOLVER_CACHE_DIR" in out


def test_missing_directory_is_created_when_a_remote_resolver_downloads_into_it(
        isolated_plugins, monkeypatch, tmp_path):
    cache_dir = tmp_path / "fresh-cache"
    monkeypatch.setenv("VLLM_PLUGINS", f"{PLUGIN_NAME},lora_s3_resolver")
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("VLLM_LORA_RESOLVER_S3_URI", "memory://adapters")
    records = load_plugins()
    assert [r.name for r in records if r.loaded] == [PLUGIN_NAME, "lora_s3_resolver"], records
    assert cache_dir.is_dir()


@pytest.mark.parametrize("plugins, variable", [
    (PLUGIN_NAME, "VLLM_LORA_RESOLVER_S3_URI"),            # the S3 plugin is not selected
    (None, "VLLM_LORA_RESOLVER_HF_REPO_LIST"),             # the Hub plugin is opt-in only
])
def test_missing_directory_is_not_created_for_a_remote_resolver_that_does_not_load(
        isolated_plugins, monkeypatch, tmp_path, plugins, variable):
    cache_dir = tmp_path / "typo"
    if plugins is not None:
        monkeypatch.setenv("VLLM_PLUGINS", plugins)
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv(variable, "memory://adapters" if "S3" in variable else "org/repo")
    [record] = [r for r in load_plugins() if r.name == PLUGIN_NAME]
    assert not record.loaded and "VLLM_LORA_RESOLVER_CACHE_DIR" in record.error
    assert not cache_dir.exists()


def test_constructor_rejects_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        FilesystemResolver(tmp_path / "file")


def test_download_cache_entries_are_left_to_remote_resolvers(lora_dir):
    """VLLM_LORA_RESOLVER_CACHE_DIR is also the remote resolvers' download cache:
    their entries (with a manifest) and bookkeeping dirs are not served from here."""
    downloaded = write_peft_adapter(lora_dir / "from-s3")
    (downloaded / ".loraplex-manifest.json").write_text("{}")
    write_peft_adapter(lora_dir / ".loraplex-tmp" / "partial")
    resolver = FilesystemResolver(lora_dir)
    assert resolve(resolver, "from-s3") is None
    with pytest.raises(AdapterNameError, match="reserves"):
        resolve(resolver, ".loraplex-tmp/partial")


def test_many_adapters_at_once_are_checked_two_at_a_time_in_order(lora_dir, monkeypatch):
    """Checking an adapter holds the GIL: 32 at once on the event loop's executor all finished
    late (filesystem.py), so they are checked two at a time in order of arrival."""
    names = [f"burst-{i}" for i in range(8)]
    for name in names:
        write_peft_adapter(lora_dir / name, rank=4)
    resolver = FilesystemResolver(lora_dir)
    lock, running, most, started = threading.Lock(), [0], [0], []
    real = resolver._request_for_path

    def checked(lora_name, *args):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            started.append(lora_name)
        time.sleep(0.02)                     # a check that takes a while, as a real header does
        try:
            return real(lora_name, *args)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(resolver, "_request_for_path", checked)

    async def main():
        return await asyncio.gather(*(resolver.resolve_lora(BASE, name) for name in names))

    results = asyncio.run(main())
    assert [r.lora_name for r in results] == names
    # In order of arrival: two threads take the queue's items one after another (either may
    # record its start first, so two neighbours can swap).
    assert most[0] == 2 and sorted(started) == sorted(names)
    assert all(abs(started.index(name) - i) <= 1 for i, name in enumerate(names)), started
