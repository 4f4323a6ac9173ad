"""The adapter cache's size bound: LRU eviction that never removes what is in use, and cleanup.

Eviction runs after each download when VLLM_LORA_RESOLVER_CACHE_MAX_BYTES is set. It
walks the downloaded entries (least recently used first, by the manifest's mtime) and
removes one only when it can take, without waiting, both the entry's name lock (nobody is
downloading or revalidating it) and its hold file exclusively (no process holds it: no
engine cache, request or resolution reads it; see holds.py). Entries in use are skipped,
so the bound may be exceeded for a while; that is counted (OVER_BOUND_LISTENERS, the
server's `lora_cache_over_bound_total`) and logged rather than breaking requests.

Removal is a rename into .loraplex-tmp/old.<uuid> (the entry vanishes at once, atomically)
followed by deleting that directory. Everything here tolerates another process doing the
same at the same moment: an entry or file that is already gone is "already gone", never an
error. A process killed between the rename and the delete leaves an old.* directory: it is
counted against the bound and removed at the next start of a cache over the directory or
the next eviction. So are the temporary directories of killed downloads, once nobody holds
their name lock.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import filelock

from loraplex.resolvers.holds import LOCK_DIR, MANIFEST_FILE, TMP_DIR, exclusive, name_lock, entry_key
from loraplex.resolvers.manifest import read_manifest

logger = logging.getLogger(__name__)

# listener(lora_name, num_bytes) after each eviction; listener(root, total_bytes, max_bytes)
# when an eviction pass leaves the cache over its bound (the adapters left are in use).
EVICTION_LISTENERS: list = []
OVER_BOUND_LISTENERS: list = []
# Test hook: called with a step's name at points where a crash must leave a cache that the
# next start repairs ("renamed-aside": an entry was just moved into .loraplex-tmp/old.*).
FAULT_HOOK = None

OLD_PREFIX = "old."


@dataclass(frozen=True)
class CacheEntry:
    lora_name: str
    path: Path
    total_bytes: int
    last_used: float


def entries(root: Path) -> list[CacheEntry]:
    """Adapters downloaded into `root` (hand-placed ones are not listed), oldest use first.
    An entry removed by someone else while this walks it is skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == str(root):
            dirnames[:] = [d for d in dirnames if d not in (TMP_DIR, LOCK_DIR)]
        if MANIFEST_FILE not in filenames:
            continue
        manifest = read_manifest(Path(dirpath))
        try:
            mtime = os.stat(os.path.join(dirpath, MANIFEST_FILE)).st_mtime
        except FileNotFoundError:
            continue
        if manifest is not None:
            found.append(CacheEntry(manifest.lora_name, Path(dirpath), manifest.total_bytes, mtime))
    return sorted(found, key=lambda e: e.last_used)


def tmp_bytes(root: Path) -> int:
    """Bytes under .loraplex-tmp: downloads in progress, and leftovers not yet removed."""
    total = 0
    for dirpath, _, filenames in os.walk(root / TMP_DIR):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                pass
    return total


def sweep_leftovers(root: Path) -> None:
    """Remove what crashed processes left in .loraplex-tmp: entries set aside (old.*) and
    downloads whose name lock nobody holds."""
    try:
        leftovers = list((root / TMP_DIR).iterdir())
    except FileNotFoundError:
        return
    for leftover in leftovers:
        if leftover.name.startswith(OLD_PREFIX):
            shutil.rmtree(leftover, ignore_errors=True)
            continue
        try:
            with name_lock(root, leftover.name.split(".", 1)[0], timeout=0):
                shutil.rmtree(leftover, ignore_errors=True)
        except filelock.Timeout:
            pass   # a live download


def set_aside(root: Path, entry: Path) -> Path | None:
    """Rename `entry` into .loraplex-tmp/old.<uuid>; None if it is already gone."""
    trash = root / TMP_DIR / f"{OLD_PREFIX}{uuid.uuid4().hex}"
    try:
        os.rename(entry, trash)
    except FileNotFoundError:
        return None
    if FAULT_HOOK is not None:
        FAULT_HOOK("renamed-aside")
    return trash


def remove_if_unheld(root: Path, lora_name: str, entry: Path) -> bool:
    """Remove a downloaded entry unless someone holds it; True if it is gone (now or before).
    The caller holds the entry's name lock."""
    with exclusive(root, lora_name) as state:
        if not state:
            return False
        if read_manifest(entry) is None:
            return not entry.exists()   # replaced by a hand-placed directory: never removed
        trash = set_aside(root, entry)
        state.unlink = True             # its hold file goes with it
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return True


def evict_to_fit(root: Path, max_bytes: int, keep: Path) -> None:
    """Evict least recently used entries nobody holds until the cache fits in `max_bytes`."""
    sweep_leftovers(root)
    found = entries(root)
    total = sum(e.total_bytes for e in found) + tmp_bytes(root)
    for victim in found:
        if total <= max_bytes:
            return
        if victim.path == keep:
            continue
        try:
            # Skip an adapter another process is downloading or revalidating right now.
            with name_lock(root, entry_key(victim.lora_name), timeout=0):
                removed = remove_if_unheld(root, victim.lora_name, victim.path)
        except filelock.Timeout:
            continue
        if not removed:
            continue
        logger.info("evicted adapter %r (%d bytes) from %s", victim.lora_name, victim.total_bytes, root)
        total -= victim.total_bytes
        _notify(EVICTION_LISTENERS, victim.lora_name, victim.total_bytes)
    if total > max_bytes:
        logger.warning("adapter cache %s holds %d bytes, over its bound of %d: the adapters left "
                       "are in use or were just downloaded", root, total, max_bytes)
        _notify(OVER_BOUND_LISTENERS, str(root), total, max_bytes)


def _notify(listeners: list, *args) -> None:
    for listener in list(listeners):
        try:
            listener(*args)
        except Exception:  # metrics must never break the cache
            logger.exception("adapter cache listener %r failed", listener)
