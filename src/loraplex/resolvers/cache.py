"""The adapter cache shared by the remote resolvers (S3/fsspec, Hugging Face Hub).

Layout of a cache directory (VLLM_LORA_RESOLVER_CACHE_DIR):

    <cache>/<lora_name>/                   the adapter, as the filesystem resolver expects it
    <cache>/<lora_name>/.loraplex-manifest.json
                                           "downloaded by loraplex, evictable" (manifest.py);
                                           its mtime is the last use
    <cache>/.loraplex-tmp/                 downloads in progress, entries being removed
                                           (same filesystem: rename is atomic)
    <cache>/.loraplex-locks/<key>.lock     one file lock per adapter name, shared by processes
    <cache>/.loraplex-locks/<key>.hold     what readers of an entry hold (holds.py)

A download becomes visible only when it is complete and validated: only the files an
adapter needs are fetched (limits.py), into .loraplex-tmp, checked (sizes against the
source's listing, then validate_adapter_dir), given a manifest, and renamed into place.
A directory without a manifest was placed by hand: it is never replaced nor evicted.
The size bound and cleanup are in eviction.py. Messages name the adapter and its source
location (what the user configured), never a directory of the server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from loraplex.errors import (AdapterInvalidError, AdapterMismatchError, AdapterNameError, ConfigError,
                             ResolverError)
from loraplex.lora_request import LoRARequest, lora_id_for_name
from loraplex.resolvers import eviction
from loraplex.resolvers.env import allow_pickle_lora_weights, env_seconds
from loraplex.resolvers.eviction import CacheEntry  # noqa: F401 (part of this module's interface)
from loraplex.resolvers.holds import (LOCK_DIR, MANIFEST_FILE, TMP_DIR, Hold, entry_key, hand_over, hold_entry,
                                      name_lock, register_cache_root)
from loraplex.resolvers.limits import AdapterLimits, env_positive_int
from loraplex.resolvers.manifest import Manifest, intact_manifest, read_manifest, write_manifest
from loraplex.resolvers.names import check_adapter_name
from loraplex.resolvers.source import AdapterSource, RemoteAdapter
from loraplex.resolvers.validation import base_model_compatible, validate_adapter_dir

logger = logging.getLogger(__name__)

# listener(lora_name, num_bytes, seconds), called from the downloading thread after each
# completed download (the server counts downloads and bytes for /metrics).
DOWNLOAD_LISTENERS: list = []

CACHE_DIR_ENV = "VLLM_LORA_RESOLVER_CACHE_DIR"
MAX_BYTES_ENV = "VLLM_LORA_RESOLVER_CACHE_MAX_BYTES"
REVALIDATE_ENV = "LORAPLEX_RESOLVER_REVALIDATE_S"
DEFAULT_CACHE_DIR = Path("~/.cache/loraplex/adapters")
DEFAULT_REVALIDATE_S = 60.0

__all__ = ["AdapterCache", "CacheEntry", "DOWNLOAD_LISTENERS", "LOCK_DIR", "MANIFEST_FILE", "Manifest",
           "TMP_DIR", "check_cache_name", "read_manifest", "write_manifest"]


class AdapterCache:
    """Downloads adapters from an AdapterSource into a cache directory, safely.

    Safe for threads and for several processes sharing one directory: a file lock
    per adapter name makes one of them download while the others wait and reuse,
    and holds (holds.py) keep what anyone reads from being evicted.
    """

    def __init__(self, root: str | os.PathLike, *, max_bytes: int | None = None,
                 revalidate_s: float = DEFAULT_REVALIDATE_S, allow_pickle: bool = False,
                 limits: AdapterLimits | None = None) -> None:
        if max_bytes is not None and max_bytes <= 0:
            raise ConfigError(f"the adapter cache's byte bound must be positive, got {max_bytes}")
        if revalidate_s < 0:
            raise ConfigError(f"the revalidation interval must be >= 0 seconds, got {revalidate_s}")
        self.root = Path(root).expanduser()
        self.max_bytes = max_bytes
        self.revalidate_s = revalidate_s
        self.allow_pickle = allow_pickle
        self.limits = limits if limits is not None else AdapterLimits()
        try:
            for sub in (TMP_DIR, LOCK_DIR):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create the adapter cache at {str(self.root)!r} ({e}); set "
                              f"{CACHE_DIR_ENV} to a writable directory") from None
        register_cache_root(self.root)
        eviction.sweep_leftovers(self.root)   # what a crashed process left behind

    @classmethod
    def from_env(cls, env=os.environ, **kwargs) -> "AdapterCache":
        """The cache configured by VLLM_LORA_RESOLVER_CACHE_DIR and friends (pickle
        weights follow LORAPLEX_ALLOW_PICKLE_LORA_WEIGHTS unless allow_pickle is given)."""
        root = env.get(CACHE_DIR_ENV) or str(DEFAULT_CACHE_DIR)
        max_bytes = env_positive_int(env, MAX_BYTES_ENV, None)
        revalidate_s = env_seconds(REVALIDATE_ENV, DEFAULT_REVALIDATE_S, allow_zero=True, env=env)
        kwargs.setdefault("allow_pickle", allow_pickle_lora_weights())
        kwargs.setdefault("limits", AdapterLimits.from_env(env))
        return cls(root, max_bytes=max_bytes, revalidate_s=revalidate_s, **kwargs)

    # -- the one public operation -------------------------------------------------

    async def resolve(self, lora_name: str, source: AdapterSource,
                      base_model_name: str | None = None) -> LoRARequest | None:
        """`get` off the event loop, as the LoRARequest a remote resolver returns."""
        path = await asyncio.to_thread(self.get, lora_name, source, base_model_name)
        if path is None:
            return None
        return LoRARequest(lora_name, lora_id_for_name(lora_name), str(path), base_model_name)

    def get(self, lora_name: str, source: AdapterSource, base_model_name: str | None = None) -> Path | None:
        """Return a local directory holding a validated copy of `lora_name`, or None
        if `source` does not have it. Blocks (call it through asyncio.to_thread).

        The directory is held until the return; inside holds.collecting_holds() the hold
        goes to the collector, so the caller can load it before anyone may evict it."""
        check_cache_name(lora_name)
        entry = self.root / lora_name
        if (entry / MANIFEST_FILE).is_file():
            # Fast path, no lock: an intact copy confirmed by the source recently. Held
            # first, checked after: once held, nobody can evict it.
            hold = hold_entry(self.root, lora_name)
            manifest = intact_manifest(entry)
            if manifest is not None and time.time() - manifest.checked_at < self.revalidate_s:
                return self._use(entry, manifest, base_model_name, hold)
            hold.release()   # the slow path may have to replace or remove it
        listed = None
        if not entry.exists():
            # Ask the source before taking a lock: names it lacks (typos, probes) must
            # not leave a lock file each behind.
            listed = (self._stat(lora_name, source), time.monotonic())
            if listed[0] is None:
                return None
        with name_lock(self.root, entry_key(lora_name)):
            return self._get_locked(lora_name, entry, source, base_model_name, listed)

    def _get_locked(self, lora_name: str, entry: Path, source: AdapterSource,
                    base_model_name: str | None, listed: tuple | None = None) -> Path | None:
        # Another process may have downloaded or revalidated it while we waited.
        manifest = intact_manifest(entry)
        if manifest is not None and time.time() - manifest.checked_at < self.revalidate_s:
            return self._use(entry, manifest, base_model_name, hold_entry(self.root, lora_name))
        ours = read_manifest(entry) is not None
        if entry.is_dir() and not ours and any(p.is_file() for p in entry.iterdir()):
            logger.warning("%s was not downloaded by loraplex (no %s); not replacing it", entry, MANIFEST_FILE)
            raise ResolverError(
                f"the adapter cache ({CACHE_DIR_ENV}) holds a directory {lora_name!r} that was not downloaded "
                f"by loraplex (no {MANIFEST_FILE}); it is never overwritten. Remove it to let the remote "
                f"resolver download {lora_name!r}, or serve it through the filesystem resolver")
        try:
            # A listing taken just before the lock is still the source's word; one
            # from before a long wait (another process downloading) is asked again.
            fresh = listed is not None and time.monotonic() - listed[1] < 1.0
            remote = listed[0] if fresh else self._stat(lora_name, source)
        except ResolverError as e:
            if manifest is None:
                raise
            logger.warning("cannot check %r at its source (%s); serving the cached copy at %s",
                           lora_name, e, entry)
            self._mark_checked(entry, manifest)
            return self._use(entry, manifest, base_model_name, hold_entry(self.root, lora_name))
        if remote is None:
            if ours:
                if eviction.remove_if_unheld(self.root, lora_name, entry):
                    logger.warning("adapter %r is gone from its source; removed the cached copy", lora_name)
                else:
                    logger.warning("adapter %r is gone from its source; its cached copy is in use and is "
                                   "left to its holders", lora_name)
            return None
        if manifest is not None and manifest.fingerprint == remote.fingerprint():
            self._mark_checked(entry, manifest)
            return self._use(entry, manifest, base_model_name, hold_entry(self.root, lora_name))
        if entry.exists() and not ours:
            raise ResolverError(
                f"{lora_name!r} is the parent directory of other cached adapters, so it cannot be cached "
                f"at that path (an adapter at a Hub repo's root and adapters in its subfolders cannot "
                f"share one cache dir); give this resolver its own {CACHE_DIR_ENV}")
        self._remove_stale_downloads(lora_name)
        if manifest is not None:
            logger.info("adapter %r changed at %s; downloading the new version", lora_name, remote.location)
        elif entry.exists():
            logger.warning("cached copy of %r is damaged (a file is missing or has the wrong size); "
                           "downloading it again", lora_name)
        started = time.monotonic()
        manifest = self._download(lora_name, entry, source, remote)
        for listener in list(DOWNLOAD_LISTENERS):
            try:
                listener(lora_name, manifest.total_bytes, time.monotonic() - started)
            except Exception:  # metrics must never break a download
                logger.exception("download listener %r failed", listener)
        hold = hold_entry(self.root, lora_name)
        if self.max_bytes is not None:
            try:
                eviction.evict_to_fit(self.root, self.max_bytes, keep=entry)
            except OSError:   # the bound is kept on a best-effort basis; the download is served
                logger.exception("evicting from the adapter cache %s failed", self.root)
        return self._use(entry, manifest, base_model_name, hold)

    def _stat(self, lora_name: str, source: AdapterSource) -> RemoteAdapter | None:
        """What the source lists, reduced to the files to download (limits.py)."""
        remote = source.stat(lora_name)
        return None if remote is None else self.limits.select(lora_name, remote, allow_pickle=self.allow_pickle)

    # -- download, validate, install --------------------------------------------

    def _download(self, lora_name: str, entry: Path, source: AdapterSource, remote: RemoteAdapter) -> Manifest:
        tmp = self.root / TMP_DIR / f"{entry_key(lora_name)}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            source.download(lora_name, remote, tmp)
            _check_sizes(tmp, remote)
            files = validate_adapter_dir(tmp, allow_pickle=self.allow_pickle,
                                         where=f"adapter {lora_name!r} from {remote.location}")
            now = time.time()
            manifest = Manifest(
                lora_name=lora_name, location=remote.location, fingerprint=remote.fingerprint(),
                files={f.name: {"size": f.size, "tag": f.tag} for f in remote.files},
                revision=remote.revision,
                base_model_name_or_path=files.config.get("base_model_name_or_path"),
                downloaded_at=now, checked_at=now)
            write_manifest(tmp, manifest)
            self._install(tmp, entry, lora_name)
            return manifest
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _install(self, tmp: Path, entry: Path, lora_name: str) -> None:
        """Rename the finished download into place; an old version is moved aside first
        (its readers keep what they opened; holders see the new version from now on)."""
        entry.parent.mkdir(parents=True, exist_ok=True)
        old = eviction.set_aside(self.root, entry) if entry.exists() else None
        try:
            os.rename(tmp, entry)
        except OSError as e:
            logger.error("cannot move %s into %s: %s", tmp, entry, e)
            raise ResolverError(f"cannot move the download of {lora_name!r} into the adapter cache "
                                f"({e.strerror}); check the cache directory's permissions and space") from None
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)

    def _remove_stale_downloads(self, lora_name: str) -> None:
        """Leftovers of a killed download (we hold the name's lock: nobody else is writing)."""
        prefix = entry_key(lora_name) + "."
        for leftover in (self.root / TMP_DIR).iterdir():
            if leftover.name.startswith(prefix):
                shutil.rmtree(leftover, ignore_errors=True)

    # -- reuse ------------------------------------------------------------------

    def _use(self, entry: Path, manifest: Manifest, base_model_name: str | None, hold: Hold) -> Path:
        if not base_model_compatible(manifest.base_model_name_or_path, base_model_name):
            hold.release()
            raise AdapterMismatchError(
                f"adapter {manifest.lora_name!r} was trained on {manifest.base_model_name_or_path!r}, "
                f"not on the served model {base_model_name!r}")
        hand_over(hold)   # to the resolution in progress, or released (its clock written) now
        return entry

    def _mark_checked(self, entry: Path, manifest: Manifest) -> None:
        manifest.checked_at = time.time()
        write_manifest(entry, manifest)

    # -- size bound (eviction.py) ---------------------------------------------------

    def entries(self) -> list[CacheEntry]:
        """Adapters this cache downloaded (hand-placed ones are not listed), oldest use first."""
        return eviction.entries(self.root)

    def total_bytes(self) -> int:
        """What the bound counts: downloaded adapters, plus downloads in progress and leftovers."""
        return sum(e.total_bytes for e in self.entries()) + eviction.tmp_bytes(self.root)


def check_cache_name(lora_name: str) -> str:
    """check_adapter_name, plus: no component may shadow the cache's own bookkeeping."""
    check_adapter_name(lora_name)
    if any(part.startswith(".loraplex") for part in lora_name.split("/")):
        raise AdapterNameError(f"adapter name {lora_name!r} has a component starting with '.loraplex', "
                               f"which the adapter cache reserves for itself; rename the adapter")
    return lora_name


def _check_sizes(tmp: Path, remote: RemoteAdapter) -> None:
    for f in remote.files:
        size = (tmp / f.name).stat().st_size if (tmp / f.name).is_file() else None
        if size != f.size:
            raise AdapterInvalidError(f"download of {remote.location}/{f.name} is incomplete: got "
                                      f"{size} bytes, the source lists {f.size}")
