"""The adapter cache's size bound with holds: what is in use is never evicted, in this process or
another; the LRU clock follows uses; crashes leave nothing that is not counted and cleaned."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapters import write_peft_adapter
from loraplex.resolvers import eviction
from loraplex.resolvers.cache import MANIFEST_FILE, TMP_DIR, AdapterCache
from loraplex.resolvers.holds import (LOCK_DIR, collecting_holds, exclusive, hold_directory, hold_file,
                                      is_held_here)
from test_cache import CountingSource, adapter_bytes

HERE = Path(__file__).parent
CRASH = str(HERE / "servers" / "cache_crash.py")


@pytest.fixture
def store(tmp_path):
    """Four adapters of one size in a file:// source."""
    for i, name in enumerate(["a", "b", "c", "d"]):
        write_peft_adapter(tmp_path / "store" / name, seed=i)
    return tmp_path / "store"


def bounded(tmp_path, store, slots: float) -> AdapterCache:
    return AdapterCache(tmp_path / "cache", max_bytes=int(slots * adapter_bytes(store / "a")))


def test_a_held_entry_is_never_evicted_and_the_bound_recovers_after_release(tmp_path, store):
    cache = bounded(tmp_path, store, 1.5)
    source = CountingSource(store)
    over_bound = []
    eviction.OVER_BOUND_LISTENERS.append(lambda *args: over_bound.append(args))
    try:
        hold = hold_directory(cache.get("a", source))     # e.g. the engine's CPU cache has it
        assert is_held_here(tmp_path / "cache" / "a")
        cache.get("b", source)                            # over the bound, but "a" is in use
        assert {e.lora_name for e in cache.entries()} == {"a", "b"}
        assert len(over_bound) == 1 and over_bound[0][1] > cache.max_bytes
        hold.release()
        cache.get("c", source)                            # now "a" and "b" may go: only "c" is left
        assert [e.lora_name for e in cache.entries()] == ["c"]
    finally:
        eviction.OVER_BOUND_LISTENERS.clear()
    assert source.downloads == ["a", "b", "c"]


def test_holds_are_counted_and_the_last_release_writes_the_lru_clock(tmp_path, store):
    cache = AdapterCache(tmp_path / "cache")
    path = cache.get("a", CountingSource(store))
    manifest = path / MANIFEST_FILE
    os.utime(manifest, (1_000_000, 1_000_000))
    first, second = hold_directory(path), hold_directory(path)
    with exclusive(cache.root, "a") as state:
        assert not state                                  # the evictor's view: in use
    first.release()
    first.release()                                       # idempotent
    assert manifest.stat().st_mtime == 1_000_000          # no I/O while still held
    with exclusive(cache.root, "a") as state:
        assert not state
    second.release()
    assert manifest.stat().st_mtime > 1_000_000           # the use, dated when the entry became evictable
    with exclusive(cache.root, "a") as state:
        assert state


def test_paths_no_cache_manages_get_a_hold_that_does_nothing(tmp_path):
    hand_placed = write_peft_adapter(tmp_path / "mine")
    AdapterCache(tmp_path / "cache")
    for path in (hand_placed, tmp_path / "nowhere", tmp_path / "cache"):
        hold = hold_directory(path)
        assert not hold.is_held and not is_held_here(path)
        hold.release()
    assert list((tmp_path / "cache" / LOCK_DIR).iterdir()) == []


def test_a_resolution_keeps_its_hold_until_the_caller_loaded_the_adapter(tmp_path, store):
    cache = bounded(tmp_path, store, 1.5)
    source = CountingSource(store)
    with collecting_holds() as held:
        path = cache.get("a", source)
    assert is_held_here(path)                              # between the download and the load
    cache.get("b", source)
    assert (path / "adapter_model.safetensors").is_file()  # the eviction skipped it
    held.release()
    assert not is_held_here(path)
    held.release()


def test_another_process_holding_an_entry_stops_its_eviction_until_it_dies(tmp_path, store):
    cache = bounded(tmp_path, store, 1.5)
    source = CountingSource(store)
    path = cache.get("a", source)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from loraplex.resolvers.holds import hold_directory; "
         "h = hold_directory(sys.argv[1]); print('held', h.is_held, flush=True); sys.stdin.read()", str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held True"
        cache.get("b", source)
        assert (path / "adapter_model.safetensors").is_file()
    finally:
        holder.kill()                                      # kill -9: the kernel drops its flock
        holder.wait()
    cache.get("c", source)
    assert not path.exists() and [e.lora_name for e in cache.entries()] == ["c"]


def test_eviction_unlinks_the_hold_file_and_a_later_holder_gets_a_fresh_one(tmp_path, store):
    cache = bounded(tmp_path, store, 1.5)
    source = CountingSource(store)
    cache.get("a", source)
    assert hold_file(cache.root, "a").exists()
    cache.get("b", source)                                 # evicts "a"
    assert not hold_file(cache.root, "a").exists()
    path = cache.get("a", source)                          # downloaded again, held again
    with hold_directory(path) as hold:
        assert hold.is_held and hold_file(cache.root, "a").exists()
        with exclusive(cache.root, "a") as state:
            assert not state


def test_removal_of_an_entry_someone_else_removed_is_not_an_error(tmp_path, store):
    cache = bounded(tmp_path, store, 1.5)
    source = CountingSource(store)
    path = cache.get("a", source)
    found = cache.entries()
    os.rename(path, tmp_path / "elsewhere")                # another process got there first
    assert eviction.remove_if_unheld(cache.root, "a", found[0].path)
    assert eviction.set_aside(cache.root, path) is None


def crash(tmp_path, store, max_bytes: int, *names: str) -> None:
    proc = subprocess.run([sys.executable, CRASH, str(tmp_path / "cache"), str(store), str(max_bytes), *names],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stdout + proc.stderr


@pytest.mark.parametrize("step", ["eviction", "replacement"])
def test_kill_after_rename_aside_is_counted_and_cleaned_at_the_next_start(tmp_path, store, step):
    one = adapter_bytes(store / "a")
    if step == "eviction":
        crash(tmp_path, store, int(1.5 * one), "a", "b")   # "b" evicts "a": killed once it is aside
        survivors = ["b"]
    else:
        AdapterCache(tmp_path / "cache").get("a", CountingSource(store))
        write_peft_adapter(store / "a", seed=42)            # a new version at the source
        crash(tmp_path, store, 0, "a")                      # killed with the old version aside
        survivors = []
    root = tmp_path / "cache"
    leftovers = [p for p in (root / TMP_DIR).iterdir() if p.name.startswith("old.")]
    assert len(leftovers) == 1 and not (root / "a").exists()
    # Counted against the bound while it exists...
    assert eviction.tmp_bytes(root) >= one
    # ... and gone at the next start of a cache over the directory.
    cache = AdapterCache(root, max_bytes=10 * one)
    assert list((root / TMP_DIR).iterdir()) == []
    assert [e.lora_name for e in cache.entries()] == survivors
    assert cache.total_bytes() == len(survivors) * one
    assert cache.get("a", CountingSource(store)) == root / "a"


def test_an_eviction_pass_sweeps_leftovers_and_a_live_download_is_kept(tmp_path, store):
    cache = bounded(tmp_path, store, 1.5)
    source = CountingSource(store)
    (tmp_path / "cache" / TMP_DIR / "old.deadbeef").mkdir()
    (tmp_path / "cache" / TMP_DIR / "old.deadbeef" / "w").write_bytes(b"x" * 1000)
    stale = tmp_path / "cache" / TMP_DIR / "zz-0123456789abcdef.99999.abcd1234"
    stale.mkdir()
    cache.get("a", source)
    cache.get("b", source)                                  # an eviction pass
    assert not (tmp_path / "cache" / TMP_DIR / "old.deadbeef").exists() and not stale.exists()


def test_lru_order_follows_holds_not_only_resolves(tmp_path, store):
    cache = bounded(tmp_path, store, 2.5)
    source = CountingSource(store)
    a = cache.get("a", source)
    time.sleep(0.01)
    cache.get("b", source)
    time.sleep(0.01)
    hold_directory(a).release()      # a request used "a" after "b" was resolved
    time.sleep(0.01)
    cache.get("c", source)           # over the bound: "b" is the least recently used now
    assert [e.lora_name for e in cache.entries()] == ["a", "c"]
