"""What a remote adapter may contain: only the files serving needs are downloaded, and a listing
with too many files or too many bytes is refused before any download."""

from __future__ import annotations

import pytest

from adapters import write_peft_adapter
from loraplex.errors import AdapterInvalidError, ConfigError
from loraplex.resolvers.cache import AdapterCache
from loraplex.resolvers.limits import AdapterLimits
from test_cache import CountingSource


def test_only_the_config_and_the_weights_are_downloaded(tmp_path):
    local = write_peft_adapter(tmp_path / "store" / "a")
    (local / "README.md").write_text("# my adapter\n")
    (local / "tokenizer.json").write_text("{}")
    (local / "optimizer.pt").write_bytes(b"\0" * 100_000)
    (local / "adapter_model.bin").write_bytes(b"pickle!")        # never fetched beside safetensors
    path = AdapterCache(tmp_path / "cache").get("a", CountingSource(tmp_path / "store"))
    assert sorted(p.name for p in path.iterdir()) == [".loraplex-manifest.json", "adapter_config.json",
                                                       "adapter_model.safetensors"]


def test_junk_at_the_source_does_not_trigger_a_new_download(tmp_path):
    local = write_peft_adapter(tmp_path / "store" / "a")
    cache = AdapterCache(tmp_path / "cache", revalidate_s=0)
    source = CountingSource(tmp_path / "store")
    cache.get("a", source)
    (local / "README.md").write_text("new notes")
    cache.get("a", source)
    assert source.downloads == ["a"]


@pytest.mark.parametrize("limits, message", [
    (AdapterLimits(max_files=3), r"lists 5 files.*at most 3 entries.*LORAPLEX_RESOLVER_MAX_ADAPTER_FILES"),
    (AdapterLimits(max_bytes=1000), r"is \d+ bytes, over the limit of 1000 bytes.*LORAPLEX_RESOLVER_MAX_ADAPTER_BYTES"),
])
def test_limits_are_checked_on_the_listing_before_any_download(tmp_path, limits, message):
    local = write_peft_adapter(tmp_path / "store" / "a")
    for i in range(3):
        (local / f"notes-{i}.txt").write_text("x")
    source = CountingSource(tmp_path / "store")
    with pytest.raises(AdapterInvalidError, match=message) as info:
        AdapterCache(tmp_path / "cache", limits=limits).get("a", source)
    assert source.downloads == []
    assert "'a' at file://" in str(info.value) and ".loraplex" not in str(info.value)


def test_weights_and_config_are_required_and_pickle_is_opt_in(tmp_path):
    store = tmp_path / "store"
    write_peft_adapter(store / "nocfg").joinpath("adapter_config.json").unlink()
    write_peft_adapter(store / "noweights").joinpath("adapter_model.safetensors").unlink()
    pickled = write_peft_adapter(store / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    source = CountingSource(store)
    cache = AdapterCache(tmp_path / "cache")
    for name, message in [("nocfg", "has no adapter_config.json"), ("noweights", "has no weights file"),
                          ("pickled", "only pickle weights")]:
        with pytest.raises(AdapterInvalidError, match=message):
            cache.get(name, source)
    assert source.downloads == []


def test_limits_from_the_environment():
    assert AdapterLimits.from_env({}) == AdapterLimits(256, 16 * 2**30)
    assert AdapterLimits.from_env({"LORAPLEX_RESOLVER_MAX_ADAPTER_FILES": "10",
                                   "LORAPLEX_RESOLVER_MAX_ADAPTER_BYTES": "2048"}) == AdapterLimits(10, 2048)
    for variable, value in [("LORAPLEX_RESOLVER_MAX_ADAPTER_FILES", "0"),
                            ("LORAPLEX_RESOLVER_MAX_ADAPTER_BYTES", "16GiB")]:
        with pytest.raises(ConfigError, match=f"{variable} must be a positive integer"):
            AdapterLimits.from_env({variable: value})


def test_default_byte_limit_fits_rank_256_on_a_70b_model():
    # Llama-3-70B: hidden 8192, intermediate 28672, 8 KV heads of 128, 80 layers; all seven projections.
    hidden, inter, kv = 8192, 28672, 1024
    per_rank = 2 * (hidden + hidden) + 2 * (hidden + kv) + 3 * (hidden + inter)
    float32_bytes = per_rank * 256 * 80 * 4
    assert float32_bytes < AdapterLimits().max_bytes
