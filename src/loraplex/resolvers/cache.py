"""The adapter cache shared by the remote resolvers (S3/fsspec, Hugging Face Hub).

Layout of a cache directory (VLLM_LORA_RESOLVER_CACHE_DIR):

    <cache>/<lora_name>/                   the adapter, as the filesystem resolver expects it
    <cache>/<lora_name>/.loraplex-manifest.json
                                           "downloaded by loraplex, evictable": source, files
                                           with size and ETag/sha, when it was last checked
                                           against the source; its mtime is the last use
    <cache>/.loraplex-tmp/                 downloads in progress (same filesystem: rename is atomic)
    <cache>/.loraplex-locks/<key>.lock     one file lock per adapter name, shared by processes

A download becomes visible only when it is complete and validated: it is written
into .loraplex-tmp, checked (sizes against the source's listing, then
validate_adapter_dir), given its manifest, and renamed into place. A directory
without a manifest was placed by hand: it is never replaced nor evicted.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import filelock

from loraplex.errors import (AdapterInvalidError, AdapterMismatchError, AdapterNameError, ConfigError,
                             ResolverError)
from loraplex.lora_request import LoRARequest, lora_id_for_name
from loraplex.resolvers.env import allow_pickle_lora_weights, env_seconds
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

MANIFEST_FILE = ".loraplex-manifest.json"
TMP_DIR = ".loraplex-tmp"
LOCK_DIR = ".loraplex-locks"
MANIFEST_FORMAT = 1


@dataclass
class Manifest:
    lora_name: str
    location: str
    fingerprint: str
    files: dict[str, dict]                  # name -> {"size": int, "tag": str | None}
    revision: str | None
    base_model_name_or_path: str | None
    downloaded_at: float
    checked_at: float                       # last time the source confirmed this version
    format: int = MANIFEST_FORMAT

    @property
    def total_bytes(self) -> int:
        return sum(f["size"] for f in self.files.values())


@dataclass(frozen=True)
class CacheEntry:
    lora_name: str
    path: Path
    total_bytes: int
    last_used: float


class AdapterCache:
    """Downloads adapters from an AdapterSource into a cache directory, safely.

    Safe for threads and for several processes sharing one directory: a file lock
    per adapter name makes one of them download while the others wait and reuse.
    """

    def __init__(self, root: str | os.PathLike, *, max_bytes: int | None = None,
                 revalidate_s: float = DEFAULT_REVALIDATE_S, allow_pickle: bool = False) -> None:
        if max_bytes is not None and max_bytes <= 0:
            raise ConfigError(f"the adapter cache's byte bound must be positive, got {max_bytes}")
        if revalidate_s < 0:
            raise ConfigError(f"the revalidation interval must be >= 0 seconds, got {revalidate_s}")
        self.root = Path(root).expanduser()
        self.max_bytes = max_bytes
        self.revalidate_s = revalidate_s
        self.allow_pickle = allow_pickle
        try:
            for sub in (TMP_DIR, LOCK_DIR):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create the adapter cache at {str(self.root)!r} ({e}); set "
                              f"{CACHE_DIR_ENV} to a writable directory") from None

    @classmethod
    def from_env(cls, env=os.environ, **kwargs) -> "AdapterCache":
        """The cache configured by VLLM_LORA_RESOLVER_CACHE_DIR and friends (pickle
        weights follow LORAPLEX_ALLOW_PICKLE_LORA_WEIGHTS unless allow_pickle is given)."""
        root = env.get(CACHE_DIR_ENV) or str(DEFAULT_CACHE_DIR)
        max_bytes = _env_byte_bound(env)
        revalidate_s = env_seconds(REVALIDATE_ENV, DEFAULT_REVALIDATE_S, allow_zero=True, env=env)
        kwargs.setdefault("allow_pickle", allow_pickle_lora_weights())
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
        if `source` does not have it. Blocks (call it through asyncio.to_thread)."""
        check_cache_name(lora_name)
        entry = self.root / lora_name
        # Fast path, no lock: an intact copy confirmed by the source recently.
        manifest = self._intact_manifest(entry)
        if manifest is not None and time.time() - manifest.checked_at < self.revalidate_s:
            return self._use(entry, manifest, base_model_name)
        listed = None
        if manifest is None and not entry.exists():
            # Ask the source before taking a lock: names it lacks (typos, probes) must
            # not leave a lock file each behind.
            listed = (source.stat(lora_name), time.monotonic())
            if listed[0] is None:
                return None
        with self._lock(lora_name):
            return self._get_locked(lora_name, entry, source, base_model_name, listed)

    def _get_locked(self, lora_name: str, entry: Path, source: AdapterSource,
                    base_model_name: str | None, listed: tuple | None = None) -> Path | None:
        self._remove_stale_downloads(lora_name)
        # Another process may have downloaded or revalidated it while we waited.
        manifest = self._intact_manifest(entry)
        if manifest is not None and time.time() - manifest.checked_at < self.revalidate_s:
            return self._use(entry, manifest, base_model_name)
        ours = read_manifest(entry) is not None
        if entry.is_dir() and not ours and any(p.is_file() for p in entry.iterdir()):
            raise ResolverError(
                f"{str(entry)!r} exists but was not downloaded by loraplex (no {MANIFEST_FILE}); it is "
                f"never overwritten. Remove it to let the remote resolver download {lora_name!r}, or "
                f"serve it through the filesystem resolver")
        try:
            # A listing taken just before the lock is still the source's word; one
            # from before a long wait (another process downloading) is asked again.
            fresh = listed is not None and time.monotonic() - listed[1] < 1.0
            remote = listed[0] if fresh else source.stat(lora_name)
        except ResolverError as e:
            if manifest is None:
                raise
            logger.warning("cannot check %r at its source (%s); serving the cached copy at %s",
                           lora_name, e, entry)
            self._mark_checked(entry, manifest)
            return self._use(entry, manifest, base_model_name)
        if remote is None:
            if ours:
                logger.warning("adapter %r is gone from its source; removing the cached copy", lora_name)
                self._remove_entry(entry)
            return None
        if manifest is not None and manifest.fingerprint == remote.fingerprint():
            self._mark_checked(entry, manifest)
            return self._use(entry, manifest, base_model_name)
        if entry.exists() and not ours:
            raise ResolverError(
                f"{str(entry)!r} is the parent directory of other cached adapters, so {lora_name!r} cannot "
                f"be cached at that path (an adapter at a Hub repo's root and adapters in its subfolders "
                f"cannot share one cache dir); give this resolver its own {CACHE_DIR_ENV}")
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
        self._evict_to_fit(keep=entry)
        return self._use(entry, manifest, base_model_name)

    # -- download, validate, install --------------------------------------------

    def _download(self, lora_name: str, entry: Path, source: AdapterSource, remote: RemoteAdapter) -> Manifest:
        tmp = self.root / TMP_DIR / f"{_key(lora_name)}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            source.download(lora_name, remote, tmp)
            _check_sizes(tmp, remote)
            files = validate_adapter_dir(tmp, allow_pickle=self.allow_pickle)
            if not files.config.get("base_model_name_or_path"):
                # Once per download, not per resolve: the cached copy is reused silently.
                logger.warning("adapter %r (%s) does not say which base model it was trained on "
                               "(base_model_name_or_path is empty); serving it unchecked",
                               lora_name, remote.location)
            now = time.time()
            manifest = Manifest(
                lora_name=lora_name, location=remote.location, fingerprint=remote.fingerprint(),
                files={f.name: {"size": f.size, "tag": f.tag} for f in remote.files},
                revision=remote.revision,
                base_model_name_or_path=files.config.get("base_model_name_or_path"),
                downloaded_at=now, checked_at=now)
            write_manifest(tmp, manifest)
            self._install(tmp, entry)
            return manifest
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _install(self, tmp: Path, entry: Path) -> None:
        """Rename the finished download into place; an old version is moved aside first."""
        entry.parent.mkdir(parents=True, exist_ok=True)
        old = None
        if entry.exists():
            old = self.root / TMP_DIR / f"old.{uuid.uuid4().hex}"
            os.rename(entry, old)
        try:
            os.rename(tmp, entry)
        except OSError as e:
            raise ResolverError(f"cannot move the download of {entry.name!r} into {str(entry)!r}: {e}") from None
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)

    def _remove_stale_downloads(self, lora_name: str) -> None:
        """Leftovers of a killed download (we hold the name's lock: nobody else is writing)."""
        prefix = _key(lora_name) + "."
        for leftover in (self.root / TMP_DIR).iterdir():
            if leftover.name.startswith(prefix):
                shutil.rmtree(leftover, ignore_errors=True)

    # -- reuse ------------------------------------------------------------------

    def _intact_manifest(self, entry: Path) -> Manifest | None:
        """The manifest, if every recorded file is present with its recorded size."""
        manifest = read_manifest(entry)
        if manifest is None:
            return None
        for name, info in manifest.files.items():
            try:
                if (entry / name).stat().st_size != info["size"]:
                    return None
            except OSError:
                return None
        return manifest

    def _use(self, entry: Path, manifest: Manifest, base_model_name: str | None) -> Path:
        if not base_model_compatible(manifest.base_model_name_or_path, base_model_name):
            raise AdapterMismatchError(
                f"adapter {manifest.lora_name!r} was trained on {manifest.base_model_name_or_path!r}, "
                f"not on the served model {base_model_name!r}")
        try:
            os.utime(entry / MANIFEST_FILE)  # the manifest's mtime is the LRU clock
        except OSError:
            pass
        return entry

    def _mark_checked(self, entry: Path, manifest: Manifest) -> None:
        manifest.checked_at = time.time()
        write_manifest(entry, manifest)

    # -- size bound -------------------------------------------------------------

    def entries(self) -> list[CacheEntry]:
        """Adapters this cache downloaded (hand-placed ones are not listed), oldest use first."""
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            if dirpath == str(self.root):
                dirnames[:] = [d for d in dirnames if d not in (TMP_DIR, LOCK_DIR)]
            if MANIFEST_FILE in filenames:
                manifest = read_manifest(Path(dirpath))
                if manifest is not None:
                    mtime = os.stat(os.path.join(dirpath, MANIFEST_FILE)).st_mtime
                    found.append(CacheEntry(manifest.lora_name, Path(dirpath), manifest.total_bytes, mtime))
        return sorted(found, key=lambda e: e.last_used)

    def _evict_to_fit(self, keep: Path) -> None:
        if self.max_bytes is None:
            return
        entries = self.entries()
        total = sum(e.total_bytes for e in entries)
        for victim in entries:
            if total <= self.max_bytes:
                return
            if victim.path == keep:
                continue
            try:
                # Skip an adapter another process is downloading or revalidating right now.
                with self._lock(victim.lora_name, timeout=0):
                    self._remove_entry(victim.path)
            except filelock.Timeout:
                continue
            logger.info("evicted adapter %r (%d bytes) from %s", victim.lora_name, victim.total_bytes, self.root)
            total -= victim.total_bytes
        if total > self.max_bytes:
            logger.warning("adapter cache %s holds %d bytes, over its bound of %d: the adapters left "
                           "are in use or were just downloaded", self.root, total, self.max_bytes)

    def _remove_entry(self, entry: Path) -> None:
        """Make the entry invisible at once (rename), then delete it."""
        trash = self.root / TMP_DIR / f"old.{uuid.uuid4().hex}"
        os.rename(entry, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _lock(self, lora_name: str, timeout: float = -1) -> filelock.FileLock:
        # A fresh FileLock per use: each holds its own descriptor, so flock() also
        # excludes other threads of this process, not only other processes.
        return filelock.FileLock(self.root / LOCK_DIR / f"{_key(lora_name)}.lock", timeout=timeout)


def check_cache_name(lora_name: str) -> str:
    """check_adapter_name, plus: no component may shadow the cache's own bookkeeping."""
    check_adapter_name(lora_name)
    if any(part.startswith(".loraplex") for part in lora_name.split("/")):
        raise AdapterNameError(f"adapter name {lora_name!r} has a component starting with '.loraplex', "
                               f"which the adapter cache reserves for itself; rename the adapter")
    return lora_name


def read_manifest(entry: Path) -> Manifest | None:
    try:
        data = json.loads((entry / MANIFEST_FILE).read_text(encoding="utf-8"))
        if data.get("format") != MANIFEST_FORMAT:
            return None
        return Manifest(**data)
    except (OSError, ValueError, TypeError):
        return None


def write_manifest(entry: Path, manifest: Manifest) -> None:
    """Write atomically: a reader sees the old or the new manifest, never half of one."""
    tmp = entry / f"{MANIFEST_FILE}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(asdict(manifest), indent=1), encoding="utf-8")
    os.replace(tmp, entry / MANIFEST_FILE)


def _check_sizes(tmp: Path, remote: RemoteAdapter) -> None:
    for f in remote.files:
        size = (tmp / f.name).stat().st_size if (tmp / f.name).is_file() else None
        if size != f.size:
            raise AdapterInvalidError(f"download of {remote.location}/{f.name} is incomplete: got "
                                      f"{size} bytes, the source lists {f.size}")


def _key(lora_name: str) -> str:
    """A flat, filesystem-safe key for a name that may contain '/'."""
    readable = "".join(c if c.isalnum() or c in "-_" else "_" for c in lora_name)[:40]
    return f"{readable}-{hashlib.blake2b(lora_name.encode(), digest_size=8).hexdigest()}"


def _env_byte_bound(env) -> int | None:
    raw = env.get(MAX_BYTES_ENV)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"{MAX_BYTES_ENV} must be a positive integer number of bytes, got {raw!r}; "
                          f"unset it for an unbounded cache")
    return value
