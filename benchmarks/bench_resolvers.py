"""Resolution latency of the remote resolvers beside the raw transfer of the same files.

    .venv/bin/python benchmarks/bench_resolvers.py [--runs 5]

An 8B-shaped adapter (hidden 4096, intermediate 14336, 32 layers, k/v out 1024,
rank 16 on all seven projections, bf16: ~84 MB) is served by `rclone serve s3`
(disk-backed, its own process) and by the Hub-compatible test server (its own
process). One resolver of each kind is built and warmed up once, as a server
holds them; each cold run then gets empty caches, so every run really downloads.

Measured (median of --runs):
  s3 raw         s3fs get of the adapter's files
  s3 resolve     RemoteResolver.resolve_lora into an empty cache (list, lock, get, validate, rename)
  hub raw        huggingface_hub.snapshot_download of the adapter's folder into an empty HF cache
  hub resolve    HfHubResolver.resolve_lora into empty caches
  * overhead     resolve time minus the transfer inside it (the source's download call:
                 s3fs get / snapshot_download), run by run: what the framework adds
  cached         resolving a name already in the local cache (no source check)
  revalidated    the same, with a metadata check against the source (LORAPLEX_RESOLVER_REVALIDATE_S=0)
  negative hit   ResolverChain.resolve of a name its negative cache holds
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from adapters import write_peft_adapter  # noqa: E402
from servers.rclone_server import ACCESS_KEY, SECRET_KEY, RcloneS3Server  # noqa: E402

HIDDEN, INTERMEDIATE, KV_OUT = 4096, 14336, 8 * 128
SHAPES_8B = {  # (in_features, out_features) of Llama-3-8B's projections
    "q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, KV_OUT), "v_proj": (HIDDEN, KV_OUT),
    "o_proj": (HIDDEN, HIDDEN), "gate_proj": (HIDDEN, INTERMEDIATE), "up_proj": (HIDDEN, INTERMEDIATE),
    "down_proj": (INTERMEDIATE, HIDDEN),
}
NAME = "llama3-8b-r16"


class TimedSource:
    """Wraps a resolver's AdapterSource to time the transfer inside each resolve."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.transfer_s: list[float] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def stat(self, lora_name):
        return self.inner.stat(lora_name)

    def download(self, lora_name, remote, dest):
        start = time.perf_counter()
        self.inner.download(lora_name, remote, dest)
        self.transfer_s.append(time.perf_counter() - start)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def start_hub(root: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    proc = subprocess.Popen([sys.executable, "-m", "servers.hub_server", str(root)], env=env,
                            stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import s3fs
    from huggingface_hub import snapshot_download
    from loraplex.resolvers import ResolverChain
    from loraplex.resolvers.cache import AdapterCache
    from loraplex.resolvers.hf_hub import HfHubResolver
    from loraplex.resolvers.remote import RemoteResolver

    work = Path(tempfile.mkdtemp(prefix="bench-resolvers-"))
    s3 = RcloneS3Server(work / "s3").start()
    hub_proc, endpoint = start_hub(work / "hub")
    try:
        # -- the adapter, on both servers ------------------------------------------
        adapter = write_peft_adapter(work / "s3" / "bench" / "loras" / NAME, rank=16, num_layers=32,
                                     target_modules=tuple(SHAPES_8B), shapes=SHAPES_8B, dtype=torch.bfloat16)
        shutil.copytree(adapter, work / "hub" / "org" / "loras" / NAME)
        size_mb = sum(f.stat().st_size for f in adapter.iterdir()) / 1e6
        options = {"endpoint_url": s3.endpoint_url, "key": ACCESS_KEY, "secret": SECRET_KEY}
        fs = s3fs.S3FileSystem(**options)
        files = [f.name for f in adapter.iterdir()]
        counter = iter(range(10**6))

        def fresh(kind: str) -> Path:
            return work / "runs" / f"{kind}-{next(counter)}"

        def s3_raw():
            dest = fresh("raw")
            dest.mkdir(parents=True)
            fs.invalidate_cache()
            fs.get([f"bench/loras/{NAME}/{f}" for f in files], [str(dest / f) for f in files])

        # One resolver of each kind, as a server holds them; each run gets empty caches.
        s3_resolver = RemoteResolver("s3://bench/loras", cache=AdapterCache(fresh("s3")), storage_options=options)
        hub_resolver = HfHubResolver("org/loras", cache=AdapterCache(fresh("hubcache")), endpoint=endpoint)
        s3_resolver.source = TimedSource(s3_resolver.source)
        hub_resolver.source = TimedSource(hub_resolver.source)

        def s3_resolve():
            s3_resolver.cache = AdapterCache(fresh("s3"))
            assert asyncio.run(s3_resolver.resolve_lora("tiny-base", NAME)) is not None

        def hub_raw():
            snapshot_download("org/loras", allow_patterns=[f"{NAME}/*"], endpoint=endpoint,
                              cache_dir=str(fresh("hf")))

        def hub_resolve():
            hub_resolver.cache = AdapterCache(fresh("hubcache"))
            hub_resolver.source.inner.hf_cache_dir = str(fresh("hf"))
            assert asyncio.run(hub_resolver.resolve_lora("tiny-base", f"org/loras/{NAME}")) is not None

        cold = {"s3 raw": s3_raw, "s3 resolve": s3_resolve, "hub raw": hub_raw, "hub resolve": hub_resolve}
        for run in cold.values():  # warm-up: clients, connection pools, page cache
            run()
        rows: dict[str, list[float]] = {k: [] for k in cold}
        s3_resolver.source.transfer_s.clear()
        hub_resolver.source.transfer_s.clear()
        for i in range(args.runs):  # interleaved, order flipped each run, so drift hits both alike
            for label, run in (cold.items() if i % 2 == 0 else reversed(cold.items())):
                rows[label].append(timed(run))
            shutil.rmtree(work / "runs")

        # -- warm paths, inside one event loop as a server runs them ----------------
        async def warm() -> dict[str, list[float]]:
            cached = RemoteResolver("s3://bench/loras", cache=AdapterCache(work / "warm"), storage_options=options)
            checked = RemoteResolver("s3://bench/loras", cache=AdapterCache(work / "warm", revalidate_s=0),
                                     storage_options=options)
            chain = ResolverChain([("lora_s3_resolver", cached)], negative_ttl_s=3600)
            await cached.resolve_lora("tiny-base", NAME)
            await chain.resolve("tiny-base", "no-such-adapter")
            out: dict[str, list[float]] = {"cached": [], "revalidated": [], "negative hit": []}
            for _ in range(max(args.runs, 20)):
                for label, call in (("cached", lambda: cached.resolve_lora("tiny-base", NAME)),
                                    ("revalidated", lambda: checked.resolve_lora("tiny-base", NAME)),
                                    ("negative hit", lambda: chain.resolve("tiny-base", "no-such-adapter"))):
                    start = time.perf_counter()
                    await call()
                    out[label].append(time.perf_counter() - start)
            return out

        # What the framework adds around the transfer, run by run (robust to the
        # transfer's own noise on a shared machine).
        rows["s3 overhead"] = [t - x for t, x in zip(rows["s3 resolve"], s3_resolver.source.transfer_s)]
        rows["hub overhead"] = [t - x for t, x in zip(rows["hub resolve"], hub_resolver.source.transfer_s)]
        rows.update(asyncio.run(warm()))
    finally:
        s3.stop()
        hub_proc.kill()
        hub_proc.wait()
        shutil.rmtree(work, ignore_errors=True)

    median_ms = {k: statistics.median(v) * 1e3 for k, v in rows.items()}
    print(f"adapter: {size_mb:.1f} MB bf16 safetensors, {args.runs} cold runs (median), "
          f"{len(rows['cached'])} warm runs (median)")
    print(f"{'what':<14}{'median ms':>12}{'min ms':>10}{'max ms':>10}")
    for k, v in rows.items():
        print(f"{k:<14}{median_ms[k]:>12.2f}{min(v) * 1e3:>10.2f}{max(v) * 1e3:>10.2f}")
    print(f"resolve minus raw (medians): s3 {median_ms['s3 resolve'] - median_ms['s3 raw']:+.1f} ms, "
          f"hub {median_ms['hub resolve'] - median_ms['hub raw']:+.1f} ms; framework time around the transfer: "
          f"s3 {median_ms['s3 overhead']:.1f} ms, hub {median_ms['hub overhead']:.1f} ms (target <= 100)")
    print(f"cached resolve {median_ms['cached']:.2f} ms (target < 5); "
          f"negative-cache hit {median_ms['negative hit']:.3f} ms (target < 1)")


if __name__ == "__main__":
    main()
