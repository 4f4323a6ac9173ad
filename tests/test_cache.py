"""AdapterCache on its own: size bound and LRU eviction, threads, manifest, settings."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest

from adapters import write_peft_adapter
from loraplex.errors import AdapterInvalidError, AdapterNameError, ConfigError
from loraplex.resolvers.cache import MANIFEST_FILE, AdapterCache, read_manifest
from loraplex.resolvers.remote import FsspecSource


class CountingSource(FsspecSource):
    """A real file:// source that counts its downloads (our class, no library patched)."""

    def __init__(self, root: Path, delay_s: float = 0.0) -> None:
        super().__init__(f"file://{root}")
        self.delay_s = delay_s
        self.downloads: list[str] = []
        self._lock = threading.Lock()

    def download(self, lora_name, remote, dest):
        with self._lock:
            self.downloads.append(lora_name)
        time.sleep(self.delay_s)  # keeps the download in flight while the other threads arrive
        super().download(lora_name, remote, dest)


def adapter_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.name != MANIFEST_FILE)


def test_lru_eviction_under_byte_bound_spares_hand_placed(tmp_path):
    store = tmp_path / "store"
    for i, name in enumerate(["a", "b", "c", "d"]):
        write_peft_adapter(store / name, seed=i)
    one = adapter_bytes(store / "a")
    cache = AdapterCache(tmp_path / "cache", max_bytes=2 * one + one // 2)  # room for two
    # A hand-placed adapter bigger than the whole bound: never counted, never deleted.
    hand = write_peft_adapter(tmp_path / "cache" / "by-hand", rank=32)
    source = CountingSource(store)

    cache.get("a", source)
    time.sleep(0.01)
    cache.get("b", source)
    time.sleep(0.01)
    cache.get("a", source)        # a is now more recently used than b
    time.sleep(0.01)
    cache.get("c", source)        # over the bound: b (least recently used) goes
    assert sorted(e.lora_name for e in cache.entries()) == ["a", "c"]
    assert not (tmp_path / "cache" / "b").exists()
    time.sleep(0.01)
    cache.get("d", source)        # a goes (c is newer)
    assert [e.lora_name for e in cache.entries()] == ["c", "d"]
    assert sum(e.total_bytes for e in cache.entries()) <= cache.max_bytes
    assert (hand / "adapter_model.safetensors").is_file() and (hand / "adapter_config.json").is_file()
    assert source.downloads == ["a", "b", "c", "d"]


def test_an_adapter_larger_than_the_bound_is_still_served(tmp_path, caplog):
    write_peft_adapter(tmp_path / "store" / "big")
    cache = AdapterCache(tmp_path / "cache", max_bytes=10)
    path = cache.get("big", CountingSource(tmp_path / "store"))
    assert path is not None and (path / "adapter_model.safetensors").is_file()
    assert "over its bound" in caplog.text


def test_threads_share_one_download(tmp_path):
    write_peft_adapter(tmp_path / "store" / "hot")
    source = CountingSource(tmp_path / "store", delay_s=0.3)
    cache = AdapterCache(tmp_path / "cache")
    results, errors = [], []

    def worker():
        try:
            results.append(cache.get("hot", source))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len(results) == 8 and len(set(results)) == 1
    assert source.downloads == ["hot"]


def test_manifest_records_sizes_and_tags(tmp_path):
    write_peft_adapter(tmp_path / "store" / "m")
    cache = AdapterCache(tmp_path / "cache")
    path = cache.get("m", CountingSource(tmp_path / "store"))
    manifest = read_manifest(path)
    assert manifest.lora_name == "m" and manifest.location.endswith("/store/m")
    assert manifest.base_model_name_or_path == "tiny-base"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert manifest.files[name]["size"] == (path / name).stat().st_size
        assert manifest.files[name]["tag"]  # file:// gives mtimes; S3 ETags; the Hub sha256/blob ids


def test_use_refreshes_lru_clock(tmp_path):
    write_peft_adapter(tmp_path / "store" / "x")
    cache = AdapterCache(tmp_path / "cache")
    source = CountingSource(tmp_path / "store")
    path = cache.get("x", source)
    os.utime(path / MANIFEST_FILE, (1_000_000, 1_000_000))
    cache.get("x", source)
    assert (path / MANIFEST_FILE).stat().st_mtime > 1_000_000
    assert source.downloads == ["x"]


def test_reserved_names_and_bad_settings(tmp_path):
    cache = AdapterCache(tmp_path / "cache")
    with pytest.raises(AdapterNameError, match="reserves"):
        cache.get("org/.loraplex-manifest.json", CountingSource(tmp_path))
    with pytest.raises(ConfigError, match="positive"):
        AdapterCache(tmp_path, max_bytes=0)
    with pytest.raises(ConfigError, match=">= 0"):
        AdapterCache(tmp_path, revalidate_s=-1)
    for variable, value, message in [
            ("LORAPLEX_RESOLVER_REVALIDATE_S", "soon", "is not a number of seconds"),
            ("LORAPLEX_RESOLVER_REVALIDATE_S", "nan", "must be a finite number of seconds"),
            ("LORAPLEX_RESOLVER_REVALIDATE_S", "-1", "must be a finite number of seconds"),
            ("VLLM_LORA_RESOLVER_CACHE_MAX_BYTES", "-5", "must be a positive integer"),
            ("VLLM_LORA_RESOLVER_CACHE_MAX_BYTES", "1e9", "must be a positive integer")]:
        with pytest.raises(ConfigError, match=f"{variable}=?.*{message}"):
            AdapterCache.from_env({"VLLM_LORA_RESOLVER_CACHE_DIR": str(tmp_path), variable: value})
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="writable directory"):
        AdapterCache(blocker / "cache")


def test_from_env_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cache = AdapterCache.from_env({})
    assert cache.root == tmp_path / ".cache" / "loraplex" / "adapters"
    assert cache.max_bytes is None and cache.revalidate_s == 60.0
    cache = AdapterCache.from_env({"VLLM_LORA_RESOLVER_CACHE_DIR": str(tmp_path / "c"),
                                   "VLLM_LORA_RESOLVER_CACHE_MAX_BYTES": "1000",
                                   "LORAPLEX_RESOLVER_REVALIDATE_S": "5"})
    assert (cache.root, cache.max_bytes, cache.revalidate_s) == (tmp_path / "c", 1000, 5.0)
    assert cache.allow_pickle is False
    monkeypatch.setenv("LORAPLEX_ALLOW_PICKLE_LORA_WEIGHTS", "1")
    assert AdapterCache.from_env({}).allow_pickle is True


def test_empty_base_model_accepted(tmp_path, caplog):
    # Served unchecked; the warning is the load's, once (test_lora_adapter.py), not the download's.
    write_peft_adapter(tmp_path / "store" / "anon", base_model_name_or_path="")
    cache = AdapterCache(tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="loraplex.resolvers.cache"):
        for _ in range(3):
            assert cache.get("anon", CountingSource(tmp_path / "store"), "any-base") is not None
    assert not caplog.records


def test_pickle_weights_accepted_only_when_allowed(tmp_path):
    local = write_peft_adapter(tmp_path / "store" / "p")
    (local / "adapter_model.safetensors").rename(local / "adapter_model.bin")
    source = CountingSource(tmp_path / "store")
    with pytest.raises(AdapterInvalidError, match="pickle"):
        AdapterCache(tmp_path / "strict").get("p", source)
    path = AdapterCache(tmp_path / "trusting", allow_pickle=True).get("p", source)
    assert (path / "adapter_model.bin").read_bytes() == (local / "adapter_model.bin").read_bytes()


def test_names_the_source_lacks_leave_no_lock_files(tmp_path):
    cache = AdapterCache(tmp_path / "cache")
    source = CountingSource(tmp_path)
    for i in range(20):
        assert cache.get(f"probe-{i}", source) is None
    assert list((tmp_path / "cache" / ".loraplex-locks").iterdir()) == []
