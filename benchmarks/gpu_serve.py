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
           received the engine's outputs): its p99 bucket and the share above 17.5 ms, and the
           cores the API server process and its engine process used while the client ran.
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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_decode  # noqa: E402  (LLAMA3_8B, SMOKE_CONFIG, write_adapters)
from gpu_serve_offline import MID_RUN_REPLAY_AT, PROFILE_WINDOW  # noqa: E402
from gpu_serve_adapters import burst_section, cold_section  # noqa: E402
from gpu_serve_server import (BASE, HERE, Server, bench, bench_argv, core_shares, cpu_seconds, env,  # noqa: E402
                              histogram, log, model_mix, profile, quantile_bound, share_above, summary_of)

SECTIONS = ["offline", "serve", "burst", "cold", "prefix"]
DEFAULT_SECTIONS = ["offline", "serve", "burst", "cold"]


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



# ---- offline ----------------------------------------------------------------------------

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
        cpu_before = cpu_seconds(server.proc.pid)
        out = bench(server.url, [*argv, "--max-concurrency", str(concurrency)], tmp / f"serve-{concurrency}-{run}.json")
        runs.append(summary_of(out))
        # How much of a core the API server used while the client ran: its headroom says
        # whether one API server process is enough (vLLM's --api-server-count).
        runs[-1].update(core_shares(cpu_before, cpu_seconds(server.proc.pid), out["duration"]))
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
