"""Die with SIGKILL right after the adapter cache renames an entry aside (test hook, no sleep).

    python cache_crash.py CACHE_DIR SOURCE_DIR MAX_BYTES NAME...

Resolves each NAME from the file:// source SOURCE_DIR into the cache (bound MAX_BYTES, 0 for
none; revalidated on every resolve). The process kills itself at the first rename aside: the
eviction of an older entry, or the replacement of a changed one.
"""

from __future__ import annotations

import os
import signal
import sys

from loraplex.resolvers import eviction
from loraplex.resolvers.cache import AdapterCache
from loraplex.resolvers.remote import FsspecSource


def die(step: str) -> None:
    if step == "renamed-aside":
        os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    cache_dir, source_dir, max_bytes, *names = sys.argv[1:]
    cache = AdapterCache(cache_dir, max_bytes=int(max_bytes) or None, revalidate_s=0)
    source = FsspecSource(f"file://{source_dir}")
    eviction.FAULT_HOOK = die
    for name in names:
        cache.get(name, source)
    print("no rename aside happened", flush=True)


if __name__ == "__main__":
    main()
