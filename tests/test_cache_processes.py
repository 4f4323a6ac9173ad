"""Four processes (two threads each) share one bounded adapter cache directory over a moto S3
bucket: many rounds of resolve-then-read with the bound far below the adapters' total size,
and no resolve fails, no read finds a removed entry, no byte is wrong."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from adapters import write_peft_adapter
from loraplex.resolvers.cache import TMP_DIR, AdapterCache
from loraplex.resolvers.remote import URI_ENV
from servers.fixtures import bucket, cache_dir, s3_server  # noqa: F401 (fixtures)
from servers.s3_server import upload_dir

HERE = Path(__file__).parent
WORKER = str(HERE / "servers" / "cache_worker.py")
NUM_ADAPTERS = 8
NUM_PROCESSES = 4
THREADS = 2
ROUNDS = 40          # per thread: 320 resolves in all


def test_four_processes_share_a_bounded_cache(s3_server, bucket, cache_dir, tmp_path):  # noqa: F811
    expected = {}
    for i in range(NUM_ADAPTERS):
        local = write_peft_adapter(tmp_path / "src" / f"a{i}", seed=i)
        upload_dir(s3_server.client(), bucket, f"loras/a{i}", local)
        expected[f"a{i}"] = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in local.iterdir()}
    one = sum(f.stat().st_size for f in (tmp_path / "src" / "a0").iterdir())
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "VLLM_", "LORAPLEX_"))}
    env.update(s3_server.env())
    env.update({URI_ENV: f"s3://{bucket}/loras", "VLLM_LORA_RESOLVER_CACHE_DIR": str(cache_dir),
                "VLLM_LORA_RESOLVER_CACHE_MAX_BYTES": str(2 * one + one // 2),   # a quarter of them
                "PYTHONPATH": str(HERE)})
    s3_server.reset_log()
    procs = [subprocess.Popen([sys.executable, WORKER, str(ROUNDS), str(THREADS), str(seed),
                               str(tmp_path / "expected.json")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for seed in range(NUM_PROCESSES)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    totals = {key: sum(r[key] for r in results) for key in ("resolves", "failed_resolves", "removed_reads",
                                                             "wrong_bytes")}
    print(f"\n{NUM_PROCESSES} processes x {THREADS} threads: {totals}, "
          f"{s3_server.downloads(bucket, 'loras/a0/adapter_model.safetensors')} downloads of a0")
    errors = [e for r in results for e in r["errors"]]
    assert totals == {"resolves": NUM_PROCESSES * THREADS * ROUNDS, "failed_resolves": 0,
                      "removed_reads": 0, "wrong_bytes": 0}, errors
    # The bound was really exercised: adapters were evicted and downloaded again.
    downloads = sum(s3_server.downloads(bucket, f"loras/a{i}/adapter_model.safetensors")
                    for i in range(NUM_ADAPTERS))
    assert downloads > 2 * NUM_ADAPTERS
    # Idle again: nothing is held, so the next eviction pass brings the cache within its bound.
    cache = AdapterCache(cache_dir, max_bytes=2 * one + one // 2)
    assert list((cache_dir / TMP_DIR).iterdir()) == []
    from loraplex.resolvers import eviction
    eviction.evict_to_fit(cache.root, cache.max_bytes, keep=cache_dir / "none")
    assert cache.total_bytes() <= cache.max_bytes
