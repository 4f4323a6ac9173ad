"""gpu_serve.py's server under test and its client: a `loraplex serve` process, runs of
`loraplex bench serve` against it (in another process), and readers of what the server
reports (its /metrics and its log)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
BASE = "base"


def log(*args) -> None:
    print(*args, flush=True)


def model_mix(num_adapters: int) -> list[str]:
    """One in eight entries is the base model, the rest go round the adapters."""
    names, adapter = [], 0
    while adapter < num_adapters:
        names.append(BASE if len(names) % 8 == 0 else f"a{adapter}")
        adapter += names[-1] != BASE
    return names



def bench_argv(models: list[str], num_prompts: int, input_len: int, output_len: int, vocab: int) -> list[str]:
    return ["--models", *models, "--model-distribution", "round-robin", "--num-prompts", str(num_prompts),
            "--random-input-len", str(input_len), "--random-output-len", str(output_len), "--ignore-eos",
            "--token-id-min", "10", "--token-id-max", str(min(vocab, 128000))]



def env(resolver_dir: Path | None = None) -> dict:
    # The caller's VLLM_* and LORAPLEX_* settings are dropped, but for the engine's switch for
    # prefill/mixed-step graphs (LORAPLEX_MIXED_STEP_GRAPHS=0 python3 benchmarks/gpu_serve.py ...)
    # and its adapter loader threads.
    out = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "LORAPLEX_"))
           or k in ("LORAPLEX_MIXED_STEP_GRAPHS", "LORAPLEX_ADAPTER_LOADER_THREADS")}
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent / "src"), os.environ.get("PYTHONPATH")]))
    if resolver_dir is not None:
        out.update({"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_PLUGINS": "lora_filesystem_resolver",
                    "VLLM_LORA_RESOLVER_CACHE_DIR": str(resolver_dir)})
    return out


class Server:
    def __init__(self, args, model: Path, adapters: dict, resolver_dir: Path, concurrency: int, log_path: Path,
                 extra: tuple[str, ...] = ()):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path, self.log = log_path, open(log_path, "w")
        modules = [f"{name}={path}" for name, path in adapters.items()]
        argv = [sys.executable, "-m", "loraplex.server.cli", "serve", str(model), "--served-model-name", BASE,
                "--load-format", "dummy", "--device", args.device, "--port", str(self.port),
                "--max-num-seqs", str(concurrency), "--enable-lora", "--max-loras", "32", "--max-lora-rank", "16",
                "--max-cpu-loras", "96", "--lora-modules", *modules, "--log-level", "warning", *extra]
        started = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env(resolver_dir))
        deadline = time.monotonic() + 900
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{log_path.read_text()[-5000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        log(f"  server (max_num_seqs {concurrency}) ready in {time.perf_counter() - started:.0f} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def bench(url: str, argv: list[str], result: Path) -> dict:
    subprocess.run([sys.executable, "-m", "loraplex.server.cli", "bench", "serve", "--base-url", url,
                    "--result-file", str(result), "--disable-tqdm", "--percentiles", "50,90,99,100", *argv],
                   check=True, capture_output=True, env=env(), timeout=1800)
    return json.loads(result.read_text())


def engine_steps(url: str) -> tuple[float, float]:
    """(now, the engine's forward passes so far) from /metrics: two readings give the mean step."""
    text = httpx.get(url + "/metrics", timeout=10).text
    line = next(line for line in text.splitlines() if line.startswith("loraplex_engine_steps_total "))
    return time.perf_counter(), float(line.split()[-1])


def mean_step_ms(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    steps = after[1] - before[1]
    return (after[0] - before[0]) / steps * 1e3 if steps > 0 else None


def summary_of(out: dict) -> dict:
    keys = ("output_throughput", "request_throughput", "completed", "failed", "median_ttft_ms", "p99_ttft_ms",
            "p100_ttft_ms", "median_itl_ms", "p99_itl_ms", "median_tpot_ms", "p99_e2el_ms")
    return {k: out[k] for k in keys}


def profile(args, server: Server, name: str, only: str | None = None,
            seconds: int | None = None) -> subprocess.Popen | None:
    """With --py-spy: samples the server and its engine process for `seconds` (--py-spy's by
    default; stop_profile ends it sooner), raw stacks to --out; `only`: "--idle" samples
    threads waiting (on a lock, in a system call) too, "--gil" only the thread holding the GIL."""
    if not args.py_spy or not args.out:
        return None
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(["py-spy", "record", "--pid", str(server.proc.pid), "--subprocesses", "--nonblocking",
                             "--rate", "200", "--duration", str(seconds or args.py_spy), "--format", "raw", "--threads",
                             "--output", str(Path(args.out) / f"pyspy-{name}.txt"), *([only] if only else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def histogram(url: str, name: str) -> dict[float, float]:
    """A /metrics histogram's cumulative counts by upper bound (le), summed over labels."""
    counts: dict[float, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        match = re.match(re.escape(name) + r'_bucket\{(?:.*,)?le="([^"]+)"(?:,.*)?\} (\S+)', line)
        if match:
            le = float(match[1])
            counts[le] = counts.get(le, 0.0) + float(match[2])
    return counts


def quantile_bound(cumulative: dict[float, float], q: float) -> float | None:
    """The smallest bucket bound (ms) under which a share q of the observations lie."""
    total = cumulative.get(float("inf"), 0.0)
    if total <= 0:
        return None
    return next((le * 1e3 for le, n in sorted(cumulative.items()) if n >= q * total), None)


def share_above(cumulative: dict[float, float], bound: float) -> float | None:
    """The share of observations above a bucket bound (seconds)."""
    total = cumulative.get(float("inf"), 0.0)
    return round(1 - cumulative.get(bound, 0.0) / total, 4) if total > 0 else None


def metric_total(url: str, name: str) -> float:
    """The sum over labels of one /metrics series (e.g. a histogram's _sum or _count)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def cpu_seconds(pid: int) -> tuple[float, float, float]:
    """(now, CPU seconds so far of process `pid`, of its children together), user and system,
    from /proc: two readings give the API server's share of a core, and its engine process's
    (its child; the other child, multiprocessing's resource tracker, is idle)."""
    def used(p: int) -> float:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:                                # gone, or not Linux
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return time.perf_counter(), used(pid), sum(used(c) for c in children)


def core_shares(before: tuple[float, float, float], after: tuple[float, float, float],
                seconds: float) -> dict[str, float]:
    """Cores used over `seconds` (the client's measured run: its start-up, when the server
    idles, would dilute the shares), by the CPU seconds between two cpu_seconds readings."""
    wall = seconds
    return {"api_server_cores": round((after[1] - before[1]) / wall, 3),
            "engine_cores": round((after[2] - before[2]) / wall, 3)}


def logged_times(log_path: Path, pattern: str, names: list[str]) -> list[float]:
    """Unix times of the server's log lines (logs.py's format) that contain `pattern` and
    one of `names` (quoted)."""
    year = time.localtime().tm_year
    quoted = {f"'{name}'" for name in names}
    times = []
    for line in log_path.read_text().splitlines():
        stamp = re.match(r"(\d\d-\d\d \d\d:\d\d:\d\d)\.(\d{3}) ", line)
        if stamp and pattern in line and any(q in line for q in quoted):
            seconds = time.mktime(time.strptime(f"{year}-{stamp[1]}", "%Y-%m-%d %H:%M:%S"))
            times.append(seconds + int(stamp[2]) / 1e3)
    return times
