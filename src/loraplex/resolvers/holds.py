"""Holds on downloaded adapters: what keeps the adapter cache from evicting a directory in use.

Whoever reads an adapter directory that an AdapterCache manages holds it: the engine's CPU
cache and device slots (an evicted copy is reloaded from the directory), every queued or
running request (its adapter may have to be reloaded before it runs), and a resolution
between the download and the engine's load. The cache's evictor skips held entries, in
this process and in every other process sharing the directory.

A hold is a shared flock() on `<cache>/.loraplex-locks/<key>.hold`; the evictor takes an
exclusive, non-blocking flock on the same file and skips the entry when it cannot get it.
Why flock: the kernel drops it when the holder dies, so a process killed with -9 leaves no
stale hold (a lease file with a pid could outlive it, or name a reused pid); it excludes
other processes and other open files of the same process alike; and taking it costs one
system call. The evictor unlinks the hold file while it holds it exclusively, so a holder
re-checks after locking that its file is still the one at that path.

Within a process, holds are counted per directory: the first opens the file and locks it,
later ones (another request for an adapter already held) only count, with no I/O. The LRU
clock moves in memory on every hold; the last release writes it to the manifest's mtime,
which is what eviction orders by. A held entry is never evicted, so its clock on disk only
needs to be right once nobody holds it.

`hold_directory(path)` is all the engine needs: for a path that is not a cache entry (an
adapter placed by hand, a user's own directory) it returns a hold that does nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

import filelock

logger = logging.getLogger(__name__)

MANIFEST_FILE = ".loraplex-manifest.json"
TMP_DIR = ".loraplex-tmp"
LOCK_DIR = ".loraplex-locks"
HOLD_SUFFIX = ".hold"
_MAX_CLASSIFIED = 4096          # paths whose kind (cache entry or not) is remembered


def entry_key(lora_name: str) -> str:
    """A flat, filesystem-safe key for a name that may contain '/' (lock and temp file names)."""
    readable = "".join(c if c.isalnum() or c in "-_" else "_" for c in lora_name)[:40]
    return f"{readable}-{hashlib.blake2b(lora_name.encode(), digest_size=8).hexdigest()}"


def hold_file(root: Path, lora_name: str) -> Path:
    return root / LOCK_DIR / f"{entry_key(lora_name)}{HOLD_SUFFIX}"


def name_lock(root: Path, key: str, timeout: float = -1) -> filelock.FileLock:
    """The lock one process holds while it downloads, replaces or evicts the entry with this
    key (entry_key(name)). A fresh FileLock per use: each holds its own descriptor, so
    flock() also excludes other threads of this process, not only other processes."""
    return filelock.FileLock(root / LOCK_DIR / f"{key}.lock", timeout=timeout)


class Hold:
    """One holder's claim on a cache entry; release() is idempotent."""

    def __init__(self, registry: "_Registry | None", path: str | None) -> None:
        self._registry, self._path = registry, path

    def release(self) -> None:
        registry, self._registry = self._registry, None
        if registry is not None:
            registry.release(self._path)

    @property
    def is_held(self) -> bool:
        return self._registry is not None

    def __enter__(self) -> "Hold":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


NO_HOLD = Hold(None, None)


class _Held:
    __slots__ = ("fd", "count", "last_used", "manifest")

    def __init__(self, fd: int, manifest: Path) -> None:
        self.fd, self.count, self.last_used, self.manifest = fd, 0, time.time(), manifest


class _Registry:
    """The process's holds: entry directory -> open, shared-locked hold file and a count."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, _Held] = {}
        self._roots: set[str] = set()
        # path -> (root, name) for cache entries, None for directories that are not;
        # absent paths are not remembered (they may be downloaded later).
        self._kinds: OrderedDict[str, tuple[Path, str] | None] = OrderedDict()

    def register_root(self, root: Path) -> None:
        with self._lock:
            self._roots.add(str(root))
            self._kinds.clear()

    def roots(self) -> list[str]:
        with self._lock:
            return sorted(self._roots)

    def hold(self, path: str, root: Path | None = None, name: str | None = None) -> Hold:
        with self._lock:
            held = self._held.get(path)
            if held is None:
                kind = (root, name) if root is not None else self._classify(path)
                if kind is None or (root is None and not os.path.isdir(path)):
                    return NO_HOLD   # not a cache entry, or one evicted since: nothing to keep
                try:
                    fd = _lock_shared(hold_file(*kind))
                except OSError as e:   # e.g. a read-only cache: serve, unprotected, rather than fail
                    logger.warning("cannot hold adapter directory %s against eviction: %s", path, e)
                    return NO_HOLD
                if not os.path.isdir(path):
                    # Evicted between the check above and the lock: the evictor deletes under
                    # its exclusive lock, so once ours is granted this answer is final.
                    os.close(fd)
                    return NO_HOLD
                held = self._held[path] = _Held(fd, Path(path) / MANIFEST_FILE)
            held.count += 1
            held.last_used = time.time()       # the LRU clock, in memory
            return Hold(self, path)

    def release(self, path: str) -> None:
        with self._lock:
            held = self._held.get(path)
            if held is None:
                return
            held.count -= 1
            if held.count > 0:
                return
            del self._held[path]
            try:   # the clock goes to disk now that the entry may be evicted
                os.utime(held.manifest, (held.last_used, held.last_used))
            except OSError:
                pass   # evicted or replaced meanwhile: nothing to date
            os.close(held.fd)

    def is_held(self, path: str) -> bool:
        with self._lock:
            return path in self._held

    def _classify(self, path: str) -> tuple[Path, str] | None:
        if path in self._kinds:
            self._kinds.move_to_end(path)
            return self._kinds[path]
        entry = Path(path)
        if not entry.is_dir():
            return None
        kind = None
        if (entry / MANIFEST_FILE).is_file():
            # The cache root is the nearest parent holding the lock directory.
            for root in entry.parents:
                if (root / LOCK_DIR).is_dir():
                    kind = (root, entry.relative_to(root).as_posix())
                    break
        self._kinds[path] = kind
        if len(self._kinds) > _MAX_CLASSIFIED:
            self._kinds.popitem(last=False)
        return kind


_REGISTRY = _Registry()


def hold_directory(path: str | os.PathLike) -> Hold:
    """Hold the adapter directory `path` until the returned Hold is released: the adapter
    cache that manages it (if any) will not evict it meanwhile. Costs no I/O when this
    process holds it already; a no-op Hold for a path no adapter cache manages."""
    return _REGISTRY.hold(str(path))


def hold_entry(root: Path, lora_name: str) -> Hold:
    """hold_directory for the cache itself, which knows the entry's root and name."""
    return _REGISTRY.hold(str(root / lora_name), root, lora_name)


def register_cache_root(root: Path) -> None:
    _REGISTRY.register_root(root)


def cache_roots() -> list[str]:
    """Roots of the adapter caches built in this process."""
    return _REGISTRY.roots()


def in_cache(path: str | os.PathLike) -> bool:
    """Whether `path` lies in the directory of an adapter cache built in this process (an
    entry that vanished from there was evicted; a path elsewhere is someone else's)."""
    path = Path(path)
    return any(path.is_relative_to(root) for root in _REGISTRY.roots())


def is_held_here(path: str | os.PathLike) -> bool:
    """Whether this process holds the directory (for tests and diagnostics)."""
    return _REGISTRY.is_held(str(path))


@contextlib.contextmanager
def exclusive(root: Path, lora_name: str):
    """Yield True while nobody (no process) holds the entry, and nobody can take a hold;
    yield False at once if someone holds it. The hold file is unlinked on the way out when
    `unlink` is set on the yielded state (the entry is gone: its hold file would be litter)."""
    path = hold_file(root, lora_name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield _Exclusive(False, path)
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield _Exclusive(False, path)
            return
        state = _Exclusive(_same_file(fd, path), path)
        yield state
        if state.acquired and state.unlink:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()   # under the exclusive lock: holders waiting on it re-open
    finally:
        os.close(fd)


class _Exclusive:
    def __init__(self, acquired: bool, path: Path) -> None:
        self.acquired, self.path, self.unlink = acquired, path, False

    def __bool__(self) -> bool:
        return self.acquired


def _lock_shared(path: Path) -> int:
    """Open `path` and take a shared flock on it, retrying if the evictor unlinked it meanwhile."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)   # waits only while an evictor checks and renames
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            return fd
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino)


# ---- holds taken during a resolution, for the one who asked ------------------------------

class HoldCollector:
    """Holds a resolver's cache took for the resolution that asked (see collecting_holds)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holds: list[Hold] = []
        self._closed = False

    def keep(self, hold: Hold) -> bool:
        with self._lock:
            if not self._closed:
                self._holds.append(hold)
                return True
        return False

    def release(self) -> None:
        with self._lock:
            self._closed = True
            holds, self._holds = self._holds, []
        for hold in holds:
            hold.release()


_COLLECTOR: contextvars.ContextVar[HoldCollector | None] = contextvars.ContextVar(
    "loraplex_hold_collector", default=None)


@contextlib.contextmanager
def collecting_holds():
    """Within this block (and the tasks and threads it starts, which copy the context), an
    adapter cache that returns a directory keeps its hold on it in the yielded collector,
    until collector.release(): the caller loads the adapter in between, and nobody can
    evict it before the engine holds it itself. The LoRARequest a resolver returns cannot
    carry a hold (its interface is vLLM's), hence the context variable."""
    collector = HoldCollector()
    token = _COLLECTOR.set(collector)
    try:
        yield collector
    finally:
        _COLLECTOR.reset(token)


def hand_over(hold: Hold) -> None:
    """Give `hold` to the resolution in progress, or release it if nobody collects."""
    collector = _COLLECTOR.get()
    if collector is None or not collector.keep(hold):
        hold.release()
