"""What a user of `loraplex serve` gets on one GPU, against `LLM.generate` on the same requests.

    PYTHONPATH=src python3 benchmarks/gpu_serve.py --out $OUT                 # everything (~10 min on an H200)
    PYTHONPATH=src python3 benchmarks/gpu_serve.py --out $OUT --only serve --concurrency 64
    PYTHONPATH=src python3 benchmarks/gpu_serve.py --smoke                    # tiny model on the CPU: checks the script

The issue-12 workload: Llama-3-8B shapes with random bf16 weights (`--load-format dummy`;
only config.json and a synthetic 128,256-token word-level tokenizer are written, so
detokenization costs what it costs), 32 rank-16 adapters on all seven projections loaded
at start-up (`--lora-modules`), prompts of 128 random token ids, 128 new tokens, greedy,
`ignore_eos`; requests round robin over a list in which one in eight is the base model.

Sections (`--only`):
  offline  `LLM.generate` of 4 x C requests with max_num_seqs C (C = each --concurrency), in
           its own process, with the mix above and with the base model only: tokens/s, and
           the engine's steady decode step (the median time between step starts while C
           sequences decode), against the runner alone: the same steps' CUDA graph replayed
           back to back (target: within 0.3 ms). The fair pair is the engine's steps around
           its 300th full-batch step against 30 replays on that step's own inputs (the last
           step's inputs, also replayed, are cheaper); gpu_serve_offline.py runs this section.
           --torch-profile: the GPU's timeline over 20 steady steps (gpu_timeline.py).
  serve    `loraplex serve --max-num-seqs C` and `loraplex bench serve --max-concurrency C` (another
           process), the same 4 x C requests, --runs times: output tokens/s (target: >= 90% of
           offline), TTFT p50 (target < 100 ms at C = 64), ITL p99 (target < 2x the median step).
           All at once by default: requests of equal lengths then start and finish in waves, and
           each wave's prefill is one long step; --request-rate R spreads them (Poisson). Each
           run also reads the server's own inter-token histogram (the gaps as the API server
           received the engine's outputs): its p99 bucket and the share above 17.5 ms.
  burst    32 never-seen adapters requested at once, each for the first time, resolved from local
           disk by the filesystem resolver: first-token p50 (target < 400 ms) and last (< 800 ms).
           With --server-flags "--log-level info", also when each adapter was resolved and
           loaded, from the server's log (ms after the first request was sent), and the engine's
           slow steps. --burst-runs N: N bursts on the same server, each of new adapters.
  cold     While 56 streams decode (over 24 of the adapters, so device slots and sequence
           seats are free; the server's max_num_seqs is C = 64), one request for a never-seen
           adapter and one for a loaded adapter sent together, 5 times with fresh adapters:
           the difference of their first-token times (target <= 100 ms, median), and the
           engine's mean step (from /metrics) while such a pair runs against while a pair of
           loaded adapters does (target: at most 1.1x).
  prefix   (only when named) prefix caching: C = the first --concurrency, prompts of a 1,024-token
           prefix shared by all plus 128 of their own, served without and with
           --enable-prefix-caching: output tokens/s, TTFT p50, and the cache's hit rate.

Results: printed, and $OUT/gpu_serve.json. Every server and offline engine is its own
process, started and stopped in turn (one 8B engine at a time on the GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gpu_decode  # noqa: E402  (LLAMA3_8B, SMOKE_CONFIG, write_adapters)
from gpu_serve_offline import MID_RUN_REPLAY_AT, PROFILE_WINDOW, stop_profile  # noqa: E402

SECTIONS = ["offline", "serve", "burst", "cold", "prefix"]
DEFAULT_SECTIONS = ["offline", "serve", "burst", "cold"]
BASE = "base"


def log(*args) -> None:
    print(*args, flush=True)


# ---- files ------------------------------------------------------------------------------

def write_model(root: Path, cfg: dict) -> Path:
    """config.json and a word-level tokenizer of the model's vocabulary (w0, w1, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    path = root / "model"
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg))
    vocab = {f"w{i}": i for i in range(cfg["vocab_size"])}
    specials = {cfg["bos_token_id"]: "<|begin_of_text|>", cfg["eos_token_id"]: "<|end_of_text|>"}
    for i, name in specials.items():
        del vocab[f"w{i}"]
        vocab[name] = i
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": specials[cfg["bos_token_id"]], "eos_token": specials[cfg["eos_token_id"]],
        "add_bos_token": False}))
    return path


def write_adapter_set(root: Path, cfg: dict, prefix: str, count: int) -> dict[str, Path]:
    """`count` adapters named prefix0.. in root (a resolver directory: root/NAME)."""
    scratch = root / f"tmp-{prefix}"
    scratch.mkdir(parents=True)
    paths = {}
    for i, path in enumerate(gpu_decode.write_adapters(scratch, cfg, count)):
        target = root / f"{prefix}{i}"
        path.rename(target)
        paths[target.name] = target
    scratch.rmdir()
    return paths


def model_mix(num_adapters: int) -> list[str]:
    """One in eight entries is the base model, the rest go round the adapters."""
    names, adapter = [], 0
    while adapter < num_adapters:
        names.append(BASE if len(names) % 8 == 0 else f"a{adapter}")
        adapter += names[-1] != BASE
    return names


# ---- offline ----------------------------------------------------------------------------

def bench_argv(models: list[str], num_prompts: int, input_len: int, output_len: int, vocab: int) -> list[str]:
    return ["--models", *models, "--model-distribution", "round-robin", "--num-prompts", str(num_prompts),
            "--random-input-len", str(input_len), "--random-output-len", str(output_len), "--ignore-eos",
            "--token-id-min", "10", "--token-id-max", str(min(vocab, 128000))]


def run_offline(args, tmp: Path, model: Path, adapters: dict, concurrency: int, num_prompts: int,
                models: list[str], name: str) -> dict:
    spec = tmp / f"offline-{concurrency}.json"
    if (args.py_spy or args.torch_profile) and args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    spec.write_text(json.dumps({"model": str(model), "device": args.device, "concurrency": concurrency,
                                "adapters": {k: str(v) for k, v in adapters.items()},
                                "py_spy_output": str(Path(args.out) / f"pyspy-{name}.txt")
                                if args.py_spy and args.out else None,
                                "torch_profile": str(Path(args.out) / f"trace-{name}.json")
                                if args.torch_profile and args.out else None,
                                "profile_window": (2, 3) if args.smoke else PROFILE_WINDOW,
                                "bench_argv": bench_argv(models, num_prompts, args.input_len,
                                                         args.output_len, args.vocab)}))
    proc = subprocess.run([sys.executable, str(HERE / "gpu_serve_offline.py"), str(spec)], capture_output=True, text=True,
                          timeout=1800, env=env())
    if proc.returncode:
        raise RuntimeError(proc.stderr[-5000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- serving ----------------------------------------------------------------------------

def env(resolver_dir: Path | None = None) -> dict:
    # The caller's VLLM_* and LORAPLEX_* settings are dropped, but for the engine's switch for
    # prefill/mixed-step graphs (LORAPLEX_MIXED_STEP_GRAPHS=0 python3 benchmarks/gpu_serve.py ...).
    out = {k: v for k, v in os.environ.items()
           if not k.startswith(("VLLM_", "LORAPLEX_")) or k == "LORAPLEX_MIXED_STEP_GRAPHS"}
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


def serve_section(args, server: Server, tmp: Path, adapters: dict, concurrency: int, num_prompts: int) -> list[dict]:
    warm = bench_argv(model_mix(len(adapters)), concurrency, args.input_len, args.output_len, args.vocab)
    bench(server.url, [*warm, "--max-concurrency", str(concurrency)], tmp / "warm.json")
    argv = bench_argv(model_mix(len(adapters)), num_prompts, args.input_len, args.output_len, args.vocab)
    if args.request_rate:                              # Poisson arrivals: a steady state, not waves
        argv += ["--request-rate", str(args.request_rate)]
    spy = profile(args, server, f"serve-{concurrency}")
    if spy is not None:                                # an extra run, sampled, left out of the figures
        bench(server.url, [*argv, "--max-concurrency", str(concurrency)], tmp / f"serve-{concurrency}-profiled.json")
        spy.wait(120)
    runs = []
    for run in range(args.runs):
        before = histogram(server.url, "loraplex_inter_token_latency_seconds")
        out = bench(server.url, [*argv, "--max-concurrency", str(concurrency)], tmp / f"serve-{concurrency}-{run}.json")
        runs.append(summary_of(out))
        # The same gaps as the API server received them (before the SSE write, the network and
        # the client): a tail the client's ITL has and this has not is the delivery's.
        gaps = {le: n - before.get(le, 0) for le, n in histogram(server.url, "loraplex_inter_token_latency_seconds").items()}
        runs[-1]["server_itl_p99_le_ms"] = quantile_bound(gaps, 0.99)
        runs[-1]["server_itl_over_18ms"] = share_above(gaps, 0.0175)
        log(f"  serve C={concurrency} run {run + 1}: {json.dumps({k: round(v, 2) for k, v in runs[-1].items()})}")
    return runs


def prefix_section(args, tmp: Path, model: Path, adapters: dict, resolver_dir: Path, concurrency: int) -> dict:
    prefix_len = 40 if args.smoke else 1024
    argv = [*bench_argv(model_mix(len(adapters)), 4 * concurrency, args.input_len, args.output_len, args.vocab),
            "--random-prefix-len", str(prefix_len), "--max-concurrency", str(concurrency)]
    result = {}
    for flag in ("--no-enable-prefix-caching", "--enable-prefix-caching"):
        server = Server(args, model, adapters, resolver_dir, concurrency, tmp / f"server-prefix{flag}.log", (flag,))
        try:
            bench(server.url, [*argv[:-2], "--num-prompts", str(concurrency), "--max-concurrency",
                               str(concurrency)], tmp / "prefix-warm.json")
            out = summary_of(bench(server.url, argv, tmp / f"prefix{flag}.json"))
            metrics = httpx.get(server.url + "/metrics", timeout=10).text
            counts = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                      if line.startswith("loraplex_prefix_cache_")}
            out["hit_rate"] = counts.get("loraplex_prefix_cache_hits_total", 0) / max(
                1, counts.get("loraplex_prefix_cache_queries_total", 0))
        finally:
            server.stop()
        result[flag.lstrip("-")] = out
        log(f"  prefix {flag}: {out['output_throughput']:.0f} tok/s, TTFT p50 {out['median_ttft_ms']:.0f} ms, "
            f"hit rate {out['hit_rate']:.2f}")
    return result


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


def burst_section(args, server: Server, tmp: Path, burst: dict, profiled: bool = True) -> dict:
    names = list(burst)
    resolution = "loraplex_lora_resolution_seconds"
    before = [metric_total(server.url, resolution + part) for part in ("_sum", "_count")]
    steps_before = engine_steps(server.url)
    log_lines_before = len(server.log_path.read_text().splitlines())
    # Every thread, waiting or not (the loaders wait in native code), and which one holds the GIL,
    # from before the client starts (it takes seconds to import) until its last request ends.
    spies = [profile(args, server, "burst", "--idle", seconds=120),
             profile(args, server, "burst-gil", "--gil", seconds=120)] if profiled else []
    out = bench(server.url, ["--models", *names, "--model-distribution", "round-robin", "--num-prompts",
                             str(len(names)), "--max-concurrency", str(len(names)), "--random-input-len",
                             str(args.input_len), "--random-output-len", "16", "--ignore-eos", "--token-id-min",
                             "10", "--token-id-max", str(min(args.vocab, 128000)), "--save-detailed"],
                tmp / "burst.json")
    for spy in spies:
        stop_profile(spy)
    after = [metric_total(server.url, resolution + part) for part in ("_sum", "_count")]
    steps_after = engine_steps(server.url)
    result = summary_of(out)
    # Few steps for the burst's length: some steps were long (the first tokens come in clumps).
    result["engine_steps"] = steps_after[1] - steps_before[1]
    # Every first token in order: spread out (loads finish one by one) or together (something waits for all).
    result["ttfts_ms"] = sorted(round(r["ttft"] * 1e3) for r in out["requests"] if r.get("ttft"))
    # With --server-flags "--log-level info", when (after the first request was sent) each
    # adapter was found by the resolver (API process) and loaded (engine process).
    sent = min(r["sent_at"] for r in out["requests"])
    for event, pattern in (("resolved", "resolved by"), ("loaded", "loaded LoRA adapter")):
        times = logged_times(server.log_path, pattern, names)
        if times:
            result[f"{event}_ms"] = sorted(round((t - sent) * 1e3) for t in times)
    # Steps of 100 ms or more during this burst, as the engine logged them (with --log-level
    # info): their count and the longest, with where its time went.
    slow = [line for line in server.log_path.read_text().splitlines()[log_lines_before:] if "slow engine step" in line]
    result["slow_steps"] = len(slow)
    if slow:
        result["slowest_step"] = max(slow, key=lambda line: int(re.search(r"step: (\d+) ms", line).group(1)))
    loads = after[1] - before[1]
    # Resolution: the resolver chain and the engine's load, as the server timed each adapter.
    result["resolution_mean_ms"] = round((after[0] - before[0]) / loads * 1e3, 1) if loads else None
    log(f"  burst of {len(names)} new adapters: first token p50 {result['median_ttft_ms']:.0f} ms, "
        f"last {result['p100_ttft_ms']:.0f} ms, failed {result['failed']}; resolution mean "
        f"{result['resolution_mean_ms']} ms over {loads:.0f}; first tokens at {result['ttfts_ms']}; "
        f"resolved at {result.get('resolved_ms')}; loaded at {result.get('loaded_ms')}; "
        f"{result['engine_steps']:.0f} engine steps, {len(slow)} of them 100 ms or more")
    return result


def cold_section(args, server: Server, tmp: Path, adapters: dict, cold: dict) -> dict:
    """Pairs (never-seen adapter, loaded adapter) sent together while 56 streams decode.
    The streams use 24 of the 32 loaded adapters, so the cold adapter finds a free device slot:
    with all 32 in use, each new adapter evicts one the streams need back at once, and the
    swaps that follow (an 80 MiB copy each) would be counted as the load's cost."""
    # Enough prompts for the probes' minute (a stream's request lasts about a second), not
    # 100,000: the client made all of them before sending any, and the first probes of earlier
    # runs met a server still waiting for its streams.
    background_argv = [*bench_argv(model_mix(min(24, len(adapters))), 100 * args.cold_concurrency, args.input_len,
                                   args.output_len, args.vocab), "--max-concurrency", str(args.cold_concurrency)]
    stop = threading.Event()

    def load(result_name: str) -> threading.Thread:
        def run():
            # A long run stopped from outside: bench serve is killed; what matters is the load.
            proc = subprocess.Popen([sys.executable, "-m", "loraplex.server.cli", "bench", "serve", "--base-url",
                                     server.url, "--disable-tqdm", *background_argv], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, env=env())
            stop.wait()
            proc.terminate()
            proc.wait(60)
        thread = threading.Thread(target=run, name=result_name)
        thread.start()
        return thread

    pair_argv = ["--model-distribution", "round-robin", "--num-prompts", "2", "--max-concurrency", "2",
                 "--random-input-len", str(args.input_len), "--random-output-len", "4", "--ignore-eos",
                 "--token-id-min", "10", "--token-id-max", str(min(args.vocab, 128000)), "--save-detailed"]
    background = load("background")
    # The streams reach steady decode: all of them running (at most a minute), then a settle.
    deadline = time.monotonic() + 60
    while (metric_total(server.url, "vllm:num_requests_running") < args.cold_concurrency
           and time.monotonic() < deadline):
        time.sleep(0.5)
    time.sleep(args.cold_settle_s)
    deltas, probes = [], []
    try:
        for i, name in enumerate(cold):
            # The background streams' mean step over each pair's lifetime: with a cold load in
            # flight against without (the load runs on the engine's loader threads).
            start = engine_steps(server.url)
            warm = bench(server.url, ["--models", "a1", "a2", *pair_argv], tmp / f"warm-pair-{i}.json")
            middle = engine_steps(server.url)
            out = bench(server.url, ["--models", name, "a1", *pair_argv], tmp / f"cold-pair-{i}.json")
            end = engine_steps(server.url)
            ttft = {r["model"]: r["ttft"] * 1e3 for r in out["requests"]}
            deltas.append(ttft[name] - ttft["a1"])
            probes.append({"cold_ms": ttft[name], "loaded_ms": ttft["a1"], "loaded_pair_ttft_ms": warm["median_ttft_ms"],
                           "loaded_pair_itl_ms": warm["median_itl_ms"], "cold_pair_itl_ms": out["median_itl_ms"],
                           "step_ms_loaded_pair": mean_step_ms(start, middle),
                           "step_ms_cold_pair": mean_step_ms(middle, end)})
            log(f"  cold {name}: first token {ttft[name]:.0f} ms, loaded adapter's {ttft['a1']:.0f} ms "
                f"(+{deltas[-1]:.0f} ms); mean step {probes[-1]['step_ms_loaded_pair']} ms without a load, "
                f"{probes[-1]['step_ms_cold_pair']} ms with one")
    finally:
        stop.set()
        background.join()
    ratios = [p["step_ms_cold_pair"] / p["step_ms_loaded_pair"] for p in probes
              if p["step_ms_cold_pair"] and p["step_ms_loaded_pair"]]
    return {"delta_ms_median": statistics.median(deltas), "deltas_ms": deltas, "probes": probes,
            # target: the others' step time up at most 10% while a cold adapter loads
            "step_ratio_median": statistics.median(ratios) if ratios else None}


# ---- main -------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="directory for gpu_serve.json")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=DEFAULT_SECTIONS)
    parser.add_argument("--concurrency", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks this script only")
    parser.add_argument("--py-spy", type=int, default=0, metavar="SECONDS",
                        help="sample the server and engine processes with py-spy during the first serve run and the burst, "
                             "and the offline worker (waits included) while it generates")
    parser.add_argument("--torch-profile", action="store_true",
                        help=f"the offline worker traces {PROFILE_WINDOW[1]} steady decode steps with torch.profiler: the "
                             "GPU's busy and idle time per step, its largest idle gaps, kernels per step "
                             "(gpu_timeline.py); the chrome trace to --out")
    parser.add_argument("--burst-runs", type=int, default=1, metavar="N",
                        help="bursts on the same server, each of its own never-seen adapters (py-spy samples the first)")
    parser.add_argument("--request-rate", type=float, default=None, metavar="R",
                        help="serve runs send requests at R per second (Poisson) instead of all at once: "
                             "clients then do not start and finish in waves (steady-state TTFT and ITL)")
    parser.add_argument("--server-flags", default="", metavar="FLAGS",
                        help="more `loraplex serve` flags for the serve/burst/cold server, given with '=' "
                             "(--server-flags='--stream-interval 4'): argparse takes a lone '--flag' for an option")
    args = parser.parse_args()
    cfg = dict(gpu_decode.LLAMA3_8B)
    # The cold probes' background: 56 streams on a server of 64 sequences, so a probe's request
    # finds a free seat. With 64, both probes queued behind the streams' own new requests, and
    # the cold one, entering the queue a load later, behind more of them: the delta measured
    # the queue's growth during the load as much as the load.
    args.device, args.input_len, args.output_len, args.cold_concurrency, args.cold_settle_s = "cuda", 128, 128, 56, 5
    counts = {"adapters": 32, "burst": 32, "cold": 5}
    if args.smoke:
        cfg.update(gpu_decode.SMOKE_CONFIG, torch_dtype="float32", bos_token_id=1, eos_token_id=2)
        gpu_decode.DEVICE = args.device = "cpu"
        args.input_len, args.output_len, args.runs, args.cold_concurrency, args.cold_settle_s = 8, 8, 1, 4, 2
        args.concurrency = [4]
        counts = {"adapters": 4, "burst": 3, "cold": 2}
    args.vocab = cfg["vocab_size"]
    tmp = Path(tempfile.mkdtemp(prefix="gpu-serve-"))
    started = time.perf_counter()
    model = write_model(tmp, cfg)
    resolver_dir = tmp / "resolver"
    resolver_dir.mkdir()
    adapters = write_adapter_set(tmp / "static", cfg, "a", counts["adapters"])
    # One set of never-seen adapters per burst run (the server keeps each set loaded).
    bursts = [write_adapter_set(resolver_dir, cfg, "burst" if run == 0 else f"burst{run + 1}-", counts["burst"])
              for run in range(args.burst_runs)] if "burst" in args.only else []
    cold = write_adapter_set(resolver_dir, cfg, "cold", counts["cold"]) if "cold" in args.only else {}
    log(f"files written in {time.perf_counter() - started:.0f} s under {tmp}")
    results: dict = {"config": vars(args).copy()}

    def save() -> None:                                # after every section: a run cut short keeps what it made
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "gpu_serve.json").write_text(json.dumps(results, indent=2))
    for concurrency in args.concurrency:
        num_prompts = 4 * concurrency
        if "offline" in args.only:
            for suffix, models in (("", model_mix(len(adapters))), ("_base", [BASE])):
                r = run_offline(args, tmp, model, adapters, concurrency, num_prompts, models,
                                f"offline-{concurrency}{suffix}")
                results[f"offline_{concurrency}{suffix}"] = r
                log(f"offline C={concurrency}{' base model only' if suffix else ''}: {r['tok_s']:.0f} tok/s, "
                    f"steady decode step {r['step_ms_median']} ms ({r['steady_steps']} steps); the runner's "
                    f"replay of its graph {r.get('replay_ms_median')} ms (in the engine: {r.get('graph_in_engine_ms_median')}, "
                    f"by hundred steps {r.get('graph_in_engine_ms_by_hundred')}; 500 replays by hundred "
                    f"{r.get('replay_sustained_ms_by_hundred')}; replays with an argmax after each "
                    f"{r.get('replay_with_argmax_ms_median')}; replays on step {MID_RUN_REPLAY_AT}'s inputs "
                    f"{r.get('replay_mid_run_ms_median')} against the engine's steps around it "
                    f"{r.get('graph_in_engine_ms_around_mid_run')}, their step {r.get('step_ms_around_mid_run')})")
                save()
        wanted = {"serve"} | ({"burst", "cold"} if concurrency == args.concurrency[0] else set())
        if not wanted & set(args.only):
            continue
        server = Server(args, model, adapters, resolver_dir, concurrency, tmp / f"server-{concurrency}.log",
                        tuple(args.server_flags.split()))
        try:
            if "serve" in args.only:
                runs = serve_section(args, server, tmp, adapters, concurrency, num_prompts)
                results[f"serve_{concurrency}"] = runs
                offline = results.get(f"offline_{concurrency}", {}).get("tok_s")
                served = statistics.median(r["output_throughput"] for r in runs)
                log(f"serve C={concurrency}: {served:.0f} tok/s median"
                    + (f", {served / offline:.2f} of offline" if offline else ""))
                save()
            if concurrency == args.concurrency[0] and "burst" in args.only:
                for run, burst in enumerate(bursts):
                    result = burst_section(args, server, tmp, burst, profiled=run == 0)
                    results["burst" if run == 0 else f"burst_{run + 1}"] = result
                    save()
            if concurrency == args.concurrency[0] and "cold" in args.only:
                results["cold"] = cold_section(args, server, tmp, adapters, cold)
                save()
        finally:
            server.stop()
            if args.out:                               # warnings and errors only (--log-level warning)
                Path(args.out).mkdir(parents=True, exist_ok=True)
                (Path(args.out) / f"server-{concurrency}.log").write_text(server.log_path.read_text()[-100000:])
    if "prefix" in args.only:
        results["prefix"] = prefix_section(args, tmp, model, adapters, resolver_dir, args.concurrency[0])
    save()
    log(json.dumps(results, indent=1)[:20000])


if __name__ == "__main__":
    main()
