"""Resolve random adapters many times into an adapter cache directory that other processes
share, reading each resolved adapter while holding it; print what happened as JSON.

    python cache_worker.py ROUNDS THREADS SEED EXPECTED_JSON

EXPECTED_JSON maps each adapter name to {file name: sha256}. The resolver is the S3 plugin's,
built from the environment (bucket URI, cache directory and bound, AWS endpoint).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sys
import threading
from pathlib import Path

from loraplex.resolvers.holds import collecting_holds
from loraplex.resolvers.remote import RemoteResolver


def main() -> None:
    rounds, num_threads, seed = (int(a) for a in sys.argv[1:4])
    expected = json.loads(Path(sys.argv[4]).read_text())
    names = sorted(expected)
    resolver = RemoteResolver.from_env()
    counts = {"resolves": 0, "failed_resolves": 0, "removed_reads": 0, "wrong_bytes": 0}
    errors: list[str] = []
    lock = threading.Lock()

    def count(key: str, error: str | None = None) -> None:
        with lock:
            counts[key] += 1
            if error is not None and len(errors) < 10:
                errors.append(error)

    def worker(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        loop = asyncio.new_event_loop()
        for _ in range(rounds):
            name = rng.choice(names)
            with collecting_holds() as held:
                try:
                    request = loop.run_until_complete(resolver.resolve_lora("tiny-base", name))
                except Exception as e:  # noqa: BLE001 - counted and reported
                    held.release()
                    count("failed_resolves", f"{name}: {type(e).__name__}: {e}")
                    continue
            count("resolves")
            try:   # what the engine does next: read the files, while the resolution holds them
                for file_name, digest in expected[name].items():
                    data = (Path(request.lora_path) / file_name).read_bytes()
                    if hashlib.sha256(data).hexdigest() != digest:
                        count("wrong_bytes", f"{name}/{file_name}")
            except FileNotFoundError as e:
                count("removed_reads", f"{name}: {e}")
            finally:
                held.release()
        loop.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(num_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({**counts, "errors": errors}), flush=True)


if __name__ == "__main__":
    main()
